"""SIGKILL the real server (Meta unreachable, webhooks arriving, archived notifications being
processed); restart: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.store.archive import NewNotification
from gateway.store.database import SqliteStore
from tests.conftest import ACME_TOKEN, API_KEY, add_conversation, free_port
from tests.fake_graph import FakeGraph
from tests.live import start, write_config
from tests.payloads import encode, message, messages_change, notification, referral, signed

EVENTS = 300


async def test_sigkill_while_meta_is_down_loses_and_duplicates_nothing(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    db = tmp_path / "crash.sqlite3"
    store = await SqliteStore.open(db)
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
    store = await SqliteStore.open(db)
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


def _bodies(count: int, per: int, tag: str) -> list[bytes]:
    return [
        encode(
            notification(
                messages_change(
                    [
                        message(
                            f"1{n:05d}{i:04d}", f"wamid.{tag}.{n}.{i}", ref=referral(f"c{n}.{i}")
                        )
                        if i % 4
                        else message(None, f"wamid.{tag}.{n}.{i}", bsuid=f"US.{tag}{n}x{i}")
                        for i in range(per)
                    ]
                )
            )
        )
        for n in range(count)
    ]


def _count(db: Path, sql: str, *params: str) -> int:
    with sqlite3.connect(db, timeout=10) as conn:
        return int(conn.execute(sql, params).fetchone()[0])


async def test_sigkill_while_processing_archived_notifications(tmp_path: Path) -> None:
    db = tmp_path / "pending.sqlite3"
    bodies = _bodies(400, 25, "p")
    store = await SqliteStore.open(db)
    for body in [*bodies, bodies[0]]:  # one delivered twice by Meta
        await store.archive_pending(
            NewNotification(body=body, received_at=time.time(), request_id=None), error="test"
        )
    await store.close()
    port = free_port()
    config = tmp_path / "gateway.toml"
    log = tmp_path / "server.log"
    write_config(config, db, port, f"http://127.0.0.1:{free_port()}")
    proc = await start(config, port, log)
    # The start processes pending notifications in the background: kill it half way.
    for _ in range(2000):
        done = _count(db, "SELECT COUNT(*) FROM webhook_notifications WHERE status = 'processed'")
        if done >= 20:
            break
        await asyncio.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert 0 < done < 401, "the kill did not land while notifications were being processed"

    proc = await start(config, port, log)
    try:
        for _ in range(600):
            if not _count(
                db, "SELECT COUNT(*) FROM webhook_notifications WHERE status != 'processed'"
            ):
                break
            await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, log.read_text()[-2000:]
    assert (
        _count(db, "SELECT COUNT(*) FROM webhook_notifications WHERE status = 'processed'") == 401
    )
    assert _count(db, "SELECT COUNT(*) FROM webhook_messages") == 400 * 25
    # Each person exactly once, each click once.
    assert _count(db, "SELECT COUNT(*) FROM conversations") == 400 * 25
    assert _count(db, "SELECT COUNT(DISTINCT ctwa_clid) FROM conversations") == 400 * 18


async def test_sigkill_during_webhooks_loses_no_acknowledged_notification(tmp_path: Path) -> None:
    db = tmp_path / "live.sqlite3"
    port = free_port()
    config = tmp_path / "gateway.toml"
    log = tmp_path / "server.log"
    write_config(config, db, port, f"http://127.0.0.1:{free_port()}")
    proc = await start(config, port, log)
    bodies = _bodies(300, 50, "l")
    acked: list[int] = []
    enough = asyncio.Event()
    url = f"http://127.0.0.1:{port}/webhooks/whatsapp"
    async with aiohttp.ClientSession() as session:

        async def send(n: int) -> None:
            try:
                async with session.post(url, data=bodies[n], headers=signed(bodies[n])) as resp:
                    if resp.status == 200:
                        await resp.read()
                        acked.append(n)
                        if len(acked) >= 30:
                            enough.set()
            except aiohttp.ClientError:
                pass  # killed before answering: Meta would retry

        tasks = [asyncio.create_task(send(n)) for n in range(len(bodies))]
        await asyncio.wait_for(enough.wait(), 60)
        proc.send_signal(signal.SIGKILL)
        await asyncio.gather(*tasks)
    await proc.wait()
    assert 30 <= len(acked) < len(bodies)
    for n in acked:
        found = _count(
            db, "SELECT COUNT(*) FROM webhook_messages WHERE wamid LIKE ?", f"wamid.l.{n}.%"
        )
        assert found == 50, f"notification {n} was acknowledged but not kept"
    assert _count(db, "SELECT COUNT(*) FROM webhook_notifications WHERE status != 'processed'") == 0
    assert _count(db, "SELECT COUNT(*) FROM conversations") == _count(
        db, "SELECT COUNT(*) FROM webhook_messages"
    )
