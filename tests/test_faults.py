"""Faults under sustained load: a flaky Meta, SIGKILL while accepting and delivering, SIGTERM.

One real gateway process after another on the same database, with clients sending unique
events the whole time and the fake Graph API failing at random. After every phase the
invariants are checked; at the end every acknowledged event must have reached Meta, and any
event Meta saw twice must be explained by the documented in-flight window of a SIGKILL.
"""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.store.database import SqliteStore
from tests.conftest import ACME_TOKEN, API_KEY, add_conversation, free_port
from tests.fake_graph import FakeGraph
from tests.live import start, write_config

FAILURES = ["500", "drop", "html", "throttle4", "429", "transient", "timeout"]
BATCH_MAX = 50
IN_FLIGHT = 2


class Load:
    """Clients sending unique events until stopped; remembers what was acknowledged."""

    def __init__(self, url: str, conversation_id: str) -> None:
        self.url = url
        self.conversation_id = conversation_id
        self.acknowledged: set[str] = set()
        self.sent = 0
        self._stop = asyncio.Event()

    async def run(self, clients: int, prefix: str) -> None:
        self._stop.clear()
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._client(session, f"{prefix}-{i}") for i in range(clients)))

    def stop(self) -> None:
        self._stop.set()

    async def _client(self, session: aiohttp.ClientSession, name: str) -> None:
        n = 0
        headers = {"Authorization": f"Bearer {API_KEY}"}
        while not self._stop.is_set():
            n += 1
            event_id = f"{name}-{n}"
            body = {
                "accountId": "acme",
                "eventName": "LeadSubmitted",
                "eventId": event_id,
                "conversationId": self.conversation_id,
            }
            self.sent += 1
            try:
                async with session.post(self.url, json=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status in (200, 202):
                        self.acknowledged.add(event_id)
                    else:
                        assert resp.status == 503, resp.status  # only while shutting down
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.02)  # the server is down: not acknowledged, try on


async def stored_ids(db: Path) -> set[str]:
    store = await SqliteStore.open(db)
    try:
        return {e.event_id for e in await store.recent_events("acme", 1_000_000)}
    finally:
        await store.close()


async def test_faults_under_load_lose_nothing(tmp_path: Path, aiohttp_server: Any) -> None:
    rng = random.Random(7)
    fake = FakeGraph(tokens={"1234567890": ACME_TOKEN})
    graph: TestServer = await aiohttp_server(fake.app())
    db = tmp_path / "faults.sqlite3"
    store = await SqliteStore.open(db)
    conversation = await add_conversation(store)
    await store.close()
    port = free_port()
    config = tmp_path / "gateway.toml"
    write_config(
        config, db, port, str(graph.make_url("")).rstrip("/"),
        batch_max=BATCH_MAX, max_in_flight=IN_FLIGHT, timeout_s=0.5,
    )  # fmt: skip
    log = tmp_path / "server.log"
    load = Load(f"http://127.0.0.1:{port}/v1/whatsapp/conversions", conversation.id)
    kills = 0

    for phase, ending in enumerate(["kill", "kill", "kill", "term"]):
        proc = await start(config, port, log)
        fake.fail(*rng.choices(FAILURES, k=6))
        running = asyncio.create_task(load.run(8, f"p{phase}"))
        await asyncio.sleep(rng.uniform(0.6, 1.2))
        if ending == "kill":
            proc.send_signal(signal.SIGKILL)
            kills += 1
            await proc.wait()
        else:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0, log.read_text()[-2000:]
        load.stop()
        await running
        # Invariant after every phase: every acknowledged event is stored.
        missing = load.acknowledged - await stored_ids(db)
        assert not missing, f"phase {phase}: acknowledged but not stored: {sorted(missing)[:5]}"

    # Meta recovers; a last run drains the outbox.
    fake.failures.clear()
    proc = await start(config, port, log)
    try:
        for _ in range(600):
            if load.acknowledged <= set(fake.event_ids()):
                break
            await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0

    received = fake.event_ids()
    lost = load.acknowledged - set(received)
    assert not lost, f"acknowledged but never delivered: {sorted(lost)[:5]}"
    duplicates = len(received) - len(set(received))
    # Only a SIGKILL between Meta's answer and the commit can resend: at most the batches
    # in flight at that moment.
    assert duplicates <= kills * BATCH_MAX * IN_FLIGHT, duplicates
    assert len(load.acknowledged) > 200  # the load was real
