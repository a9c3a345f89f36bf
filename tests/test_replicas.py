"""Three gateway processes on one PostgreSQL, Meta flaky, one replica SIGKILLed mid-load and
another mid-delivery: every event that got a 2xx is stored once and reaches Meta once, apart
from the documented in-flight window of a killed process, and the counts say so."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.store.postgres import PostgresStore
from tests.conftest import ACME_TOKEN, API_KEY, add_conversation
from tests.fake_graph import FakeGraph
from tests.live import Replicas

EVENTS = 240
# Small batches, two in flight: what a killed replica may have had on the wire.
DELIVERY = {"batch_max": 5, "max_in_flight": 2, "claim_lease_s": 1.0, "poll_s": 0.2,
            "respond_within_ms": 50, "retry_base_s": 0.05, "retry_cap_s": 0.2}  # fmt: skip
IN_FLIGHT = DELIVERY["batch_max"] * DELIVERY["max_in_flight"]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


async def _send_all(replicas: Replicas, conversation_id: str, kill_at: int) -> set[str]:
    """Post every event, spread over the replicas; a refused or cut request is retried on the
    next one (the same eventId, as a client does). Kill replica 0 after ``kill_at`` answers.
    Return the eventIds answered 2xx."""
    accepted: set[str] = set()
    answered = 0
    gate = asyncio.Semaphore(24)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def one(n: int) -> None:
            nonlocal answered
            body = {"accountId": "acme", "eventName": "LeadSubmitted",
                    "eventId": f"r-{n}", "conversationId": conversation_id}  # fmt: skip
            for attempt in range(20):
                alive = replicas.alive()
                port = replicas.ports[alive[(n + attempt) % len(alive)]]
                url = f"http://127.0.0.1:{port}/v1/whatsapp/conversions"
                try:
                    async with gate, session.post(url, json=body, headers=HEADERS) as resp:
                        await resp.read()
                        if resp.status < 300:
                            accepted.add(body["eventId"])
                            answered += 1
                            if answered == kill_at:
                                await replicas.kill(0)
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.05)

        await asyncio.gather(*(one(n) for n in range(EVENTS)))
    return accepted


async def test_three_replicas_survive_two_kills_and_send_each_event_once(
    tmp_path: Path, aiohttp_server: Any, pg_url: str
) -> None:
    store = await PostgresStore.open(pg_url, min_connections=1, max_connections=3)
    conversation = await add_conversation(store)
    await store.close()
    fake = FakeGraph(tokens={"1234567890": ACME_TOKEN}, delay_s=0.05)
    graph: TestServer = await aiohttp_server(fake.app())
    replicas = Replicas(
        tmp_path, 3, str(graph.make_url("")).rstrip("/"), store_url=pg_url, **DELIVERY
    )
    await replicas.start_all()

    async def flaky() -> None:
        # One request in five fails, as Meta sometimes does.
        n = 0
        while True:
            n += 1
            if n % 5 == 0 and len(fake.failures) < 2:
                fake.fail("500" if n % 10 else "timeout")
            await asyncio.sleep(0.02)

    chaos = asyncio.create_task(flaky())
    try:
        accepted = await _send_all(replicas, conversation.id, kill_at=EVENTS // 3)
        assert len(accepted) == EVENTS, "every event was answered 2xx by some replica"
        # A replacement starts; Meta slows down, so batches are in flight when replica 1 dies.
        await replicas.start(0)
        fake.delay_s = 0.3
        await asyncio.sleep(0.2)
        await replicas.kill(1)
        for _ in range(600):
            if accepted <= set(fake.event_ids()):
                break
            await asyncio.sleep(0.05)
        chaos.cancel()
        fake.delay_s = 0.0
        await asyncio.sleep(2.5)  # leases of the dead run out; anything twice shows up
    finally:
        chaos.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await chaos
        await replicas.stop_all()

    sent = Counter(fake.event_ids())
    missing = accepted - set(sent)
    assert not missing, f"{len(missing)} accepted events never reached Meta"
    twice = {event_id: n for event_id, n in sent.items() if n > 1}
    # Each kill may resend what that replica had in flight, and no more.
    assert sum(n - 1 for n in twice.values()) <= 2 * IN_FLIGHT, twice

    store = await PostgresStore.open(pg_url, min_connections=1, max_connections=3)
    try:
        rows = await store.query("SELECT event_id, status FROM events")
        assert len(rows) == len({r[0] for r in rows}) == EVENTS  # stored once per eventId
        assert Counter(r[1] for r in rows) == {"delivered": EVENTS}
        counts = await store.query(
            "SELECT status, deliveries FROM delivery_counts WHERE deliveries != 0"
        )
        assert [(s, int(n)) for s, n in counts] == [("delivered", EVENTS)]
        assert await store.query(
            "SELECT COUNT(*) FROM deliveries WHERE claimed_by IS NOT NULL"
        ) == [(0,)]
    finally:
        await store.close()
