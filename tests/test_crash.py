"""SIGKILL the real server while Meta is unreachable; restart: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.store import Store
from tests.conftest import ACME_TOKEN, API_KEY, add_conversation
from tests.fake_graph import FakeGraph
from tests.live import free_port, start, write_config

EVENTS = 300


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


async def test_sigterm_finishes_requests_in_flight(tmp_path: Path, aiohttp_server: Any) -> None:
    db = tmp_path / "term.sqlite3"
    store = await Store.open(db)
    conversation = await add_conversation(store)
    await store.close()
    # Meta answers slowly, so the request is still waiting for its delivery when SIGTERM comes.
    fake = FakeGraph(tokens={"1234567890": ACME_TOKEN}, delay_s=0.6)
    graph: TestServer = await aiohttp_server(fake.app())
    port = free_port()
    config = tmp_path / "gateway.toml"
    write_config(config, db, port, str(graph.make_url("")).rstrip("/"), respond_within_ms=5000)
    log = tmp_path / "server.log"
    proc = await start(config, port, log)
    body = {
        "accountId": "acme",
        "eventName": "LeadSubmitted",
        "eventId": "in-flight",
        "conversationId": conversation.id,
    }
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/v1/whatsapp/conversions"
        request = asyncio.create_task(
            session.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        )
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        resp = await request
        answer = await resp.json()
        resp.release()
    assert resp.status == 200, answer
    assert answer["status"] == "delivered"
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert fake.event_ids() == ["in-flight"]
