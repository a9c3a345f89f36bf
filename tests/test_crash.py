"""SIGKILL the real server while Meta is unreachable; restart: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from aiohttp.test_utils import TestServer

from gateway.store import Store
from tests.conftest import ACME_TOKEN, API_KEY, ENV, add_conversation, base_config
from tests.fake_graph import FakeGraph

EVENTS = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(path: Path, db: Path, port: int, graph_url: str) -> None:
    config: dict[str, Any] = base_config(db)
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
        },
    }
    config["logging"] = {"format": "json", "level": "warning"}
    path.write_bytes(tomli_w.dumps(config).encode())


async def start(config: Path, port: int, log: Path) -> asyncio.subprocess.Process:
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


async def test_sigkill_while_meta_is_down_loses_and_duplicates_nothing(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    db = tmp_path / "crash.sqlite3"
    store = await Store.open(db)
    conversation = await add_conversation(store)
    await store.close()
    port = free_port()
    config = tmp_path / "gateway.toml"
    log = tmp_path / "server.log"
    # Phase 1: Meta unreachable (nothing listens on that port).
    write_config(config, db, port, f"http://127.0.0.1:{free_port()}")
    proc = await start(config, port, log)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = f"http://127.0.0.1:{port}/v1/whatsapp/conversions"
    async with aiohttp.ClientSession() as session:

        async def send(i: int) -> int:
            body = {
                "accountId": "acme",
                "eventName": "LeadSubmitted",
                "eventId": f"crash-{i}",
                "conversationId": conversation.id,
            }
            async with session.post(url, json=body, headers=headers) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(send(i) for i in range(EVENTS)))
    assert set(statuses) == {202}  # accepted, stored, not delivered
    proc.send_signal(signal.SIGKILL)
    await proc.wait()

    # Phase 2: Meta is back; the restarted gateway resumes the outbox.
    fake = FakeGraph(tokens={"1234567890": ACME_TOKEN})
    server: TestServer = await aiohttp_server(fake.app())
    write_config(config, db, port, str(server.make_url("")).rstrip("/"))
    proc = await start(config, port, log)
    try:
        for _ in range(600):
            if len(fake.received) >= EVENTS:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # anything extra would show up now
        ids = fake.event_ids()
        assert sorted(ids) == sorted(f"crash-{i}" for i in range(EVENTS)), log.read_text()[-2000:]
        assert len(ids) == len(set(ids)) == EVENTS
        async with aiohttp.ClientSession() as session:
            params = {"accountId": "acme", "limit": "200"}
            async with session.get(url, params=params, headers=headers) as resp:
                events = (await resp.json())["events"]
        assert {e["status"] for e in events} == {"delivered"}
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0, log.read_text()[-2000:]
