"""Helpers for tests that run the real gateway as a subprocess on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import tomli_w

from tests.conftest import ENV, base_config, free_port


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


class Replicas:
    """``count`` gateway processes serving one store: the PostgreSQL database ``store_url``,
    or else one SQLite file (several processes may serve it)."""

    def __init__(
        self,
        tmp_path: Path,
        count: int,
        graph_url: str,
        *,
        store_url: str | None = None,
        **meta: Any,
    ) -> None:
        self.tmp_path, self.graph_url = tmp_path, graph_url
        self.store_url, self.meta = store_url, meta
        self.db = tmp_path / "replicas.sqlite3"
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[asyncio.subprocess.Process | None] = [None] * count
        self.log = tmp_path / "replicas.log"

    async def start(self, i: int) -> None:
        config = self.tmp_path / f"replica{i}.toml"
        write_config(
            config, self.db, self.ports[i], self.graph_url, store_url=self.store_url, **self.meta
        )
        self.procs[i] = await start(config, self.ports[i], self.log)

    async def start_all(self) -> None:
        for i in range(len(self.procs)):
            await self.start(i)

    async def kill(self, i: int) -> None:
        proc = self.procs[i]
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        self.procs[i] = None

    async def stop_all(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 30)

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None]

    def url(self, i: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[i]}{path}"


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
