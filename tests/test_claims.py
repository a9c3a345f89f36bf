"""Several processes on one store deliver, and Meta gets each event once: delivery claims live
in the store, not in any process's memory (issue 12's two reproductions, and a SIGKILL)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.store.database import SqliteStore
from tests.conftest import ACME_TOKEN, API_KEY, ENV, add_conversation, free_port
from tests.fake_graph import FakeGraph
from tests.live import start, write_config

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
# Small batches and a slow Meta: many batches, several in flight at any moment.
DELIVERY: dict[str, Any] = {
    "batch_max": 5,
    "max_in_flight": 2,
    "respond_within_ms": 0,
    "poll_s": 0.1,
}


async def _setup(
    tmp_path: Path, aiohttp_server: Any, delay_s: float
) -> tuple[Path, str, FakeGraph, str]:
    db = tmp_path / "store.sqlite3"
    store = await SqliteStore.open(db)
    conversation = await add_conversation(store)
    await store.close()
    fake = FakeGraph(tokens={"1234567890": ACME_TOKEN}, delay_s=delay_s)
    graph: TestServer = await aiohttp_server(fake.app())
    return db, conversation.id, fake, str(graph.make_url("")).rstrip("/")


def _lead(conversation_id: str, event_id: str) -> dict[str, Any]:
    return {
        "accountId": "acme",
        "eventName": "LeadSubmitted",
        "eventId": event_id,
        "conversationId": conversation_id,
    }


async def _post(port: int, bodies: list[dict[str, Any]]) -> None:
    url = f"http://127.0.0.1:{port}/v1/whatsapp/conversions"
    async with aiohttp.ClientSession() as session:

        async def one(body: dict[str, Any]) -> int:
            async with session.post(url, json=body, headers=HEADERS) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(body) for body in bodies))
    assert set(statuses) == {202}, Counter(statuses)


async def _until_received(fake: FakeGraph, wanted: set[str], timeout_s: float) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if wanted <= set(fake.event_ids()):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # anything sent twice would show up now


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


async def test_send_beside_a_delivering_server_sends_nothing_twice(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    # Tried by an operator: `ctwa-gateway send` while the server delivered; Meta received 459
    # events for 303 ids.
    db, conversation_id, fake, graph_url = await _setup(tmp_path, aiohttp_server, delay_s=0.05)
    port, config, log = free_port(), tmp_path / "gateway.toml", tmp_path / "server.log"
    write_config(config, db, port, graph_url, **DELIVERY)
    server = await start(config, port, log)
    try:
        await _post(port, [_lead(conversation_id, f"serve-{i}") for i in range(150)])
        events = tmp_path / "events.jsonl"
        events.write_text(
            "".join(json.dumps(_lead(conversation_id, f"send-{i}")) + "\n" for i in range(50))
        )
        assert len(fake.event_ids()) < 150, "the server was done before send started"
        send = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "send", "--config", str(config), str(events),
            env={**os.environ, **ENV}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(send.communicate(), 60)
        assert send.returncode == 0, err.decode()[-2000:]
        assert len(out.splitlines()) == 50
        wanted = {f"serve-{i}" for i in range(150)} | {f"send-{i}" for i in range(50)}
        await _until_received(fake, wanted, timeout_s=30)
    finally:
        await _stop(server)
    sent = Counter(fake.event_ids())
    assert set(sent) == wanted, log.read_text()[-2000:]
    assert [id_ for id_, n in sent.items() if n > 1] == []


async def test_a_second_server_on_a_busy_port_sends_nothing_twice(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    # Tried by an operator: a second `serve` on a port in use sent 67 of 200 pending events a
    # second time before it crashed.
    db, conversation_id, fake, graph_url = await _setup(tmp_path, aiohttp_server, delay_s=0.05)
    port, config, log = free_port(), tmp_path / "gateway.toml", tmp_path / "server.log"
    write_config(config, db, port, graph_url, **DELIVERY)
    server = await start(config, port, log)
    try:
        await _post(port, [_lead(conversation_id, f"e-{i}") for i in range(200)])
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config),
            env={**os.environ, **ENV}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode != 0, out.decode()[-2000:]
        wanted = {f"e-{i}" for i in range(200)}
        await _until_received(fake, wanted, timeout_s=30)
    finally:
        await _stop(server)
    sent = Counter(fake.event_ids())
    assert set(sent) == wanted
    assert [id_ for id_, n in sent.items() if n > 1] == []


async def test_a_killed_servers_claims_expire_and_another_delivers_them(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    """SIGKILL one of two servers on one store while Meta is slow: the other takes over what
    the dead one had claimed once its leases run out, and only the batches that were in
    flight at the kill may reach Meta twice."""
    db, conversation_id, fake, graph_url = await _setup(tmp_path, aiohttp_server, delay_s=0.3)
    ports = free_port(), free_port()
    configs = tmp_path / "a.toml", tmp_path / "b.toml"
    log = tmp_path / "servers.log"
    for port, config in zip(ports, configs, strict=True):
        write_config(config, db, port, graph_url, **DELIVERY, claim_lease_s=1.0)
    doomed = await start(configs[0], ports[0], log)
    survivor = await start(configs[1], ports[1], log)
    try:
        await _post(ports[0], [_lead(conversation_id, f"k-{i}") for i in range(60)])
        await asyncio.sleep(0.5)  # both have batches in flight
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
        wanted = {f"k-{i}" for i in range(60)}
        await _until_received(fake, wanted, timeout_s=30)
    finally:
        await _stop(survivor)
    sent = Counter(fake.event_ids())
    assert set(sent) == wanted, log.read_text()[-2000:]
    twice = sum(n - 1 for n in sent.values())
    in_flight = DELIVERY["batch_max"] * DELIVERY["max_in_flight"]
    assert twice <= in_flight, f"{twice} sent twice; the dead server had {in_flight} in flight"
