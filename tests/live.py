"""Helpers for tests that run the real gateway as a subprocess on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import tomli_w

from tests.conftest import ENV, base_config


def write_config(
    path: Path, db: Path, port: int, graph_url: str, *, store_url: str | None = None, **meta: Any
) -> None:
    """Write a config for a server on ``port`` delivering to ``graph_url`` (meta_capi), on
    the SQLite file ``db`` or the PostgreSQL database ``store_url``."""
    config: dict[str, Any] = base_config(db)
    if store_url is not None:
        config["store"] = {"url": store_url}
    config["server"] = {"host": "127.0.0.1", "port": port}
    config["plugins"] = {
        "sinks": ["meta_capi"],
        "meta_capi": {
            "graph_url": graph_url,
            "timeout_s": 1.0,
            "retry_base_s": 0.2,
            "retry_cap_s": 0.5,
            "respond_within_ms": 100,
            "poll_s": 0.2,
            "linger_ms": 10,
            **meta,
        },
    }
    config["logging"] = {"format": "json", "level": "warning"}
    path.write_bytes(tomli_w.dumps(config).encode())


async def start(config: Path, port: int, log: Path) -> asyncio.subprocess.Process:
    """Start ``python -m gateway serve`` and wait until it accepts connections."""
    out = log.open("ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config),
        env={**os.environ, **ENV}, stdout=out, stderr=out,
    )  # fmt: skip
    out.close()
    for _ in range(300):
        if proc.returncode is not None:
            raise AssertionError(log.read_text()[-3000:])
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return proc
    raise AssertionError("the server did not start")


def raw_http(host: str, port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """Send request bytes no HTTP client would (non-ASCII, control bytes); return the status,
    the response head and its body."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    response_head, _, response_body = answer.partition(b"\r\n\r\n")
    return int(answer.split(b" ", 2)[1]), response_head, response_body
