"""PostgreSQL under contention: captures racing on two replicas, statements that wait on
locks, a server that stops answering."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.capture.extract import extract
from gateway.config import parse_settings
from gateway.store.postgres import PostgresStore
from tests.conftest import ClientFactory, add_conversation, db_rows, store_of
from tests.payloads import (
    automatic_change,
    encode,
    message,
    messages_change,
    notification,
    signed,
)
from tests.postgres import sessions_waiting_on_locks

Client = TestClient[web.Request, web.Application]
WEBHOOK = "/webhooks/whatsapp"


@pytest.fixture
def engine() -> str:
    return "postgresql"


async def test_an_automatic_events_click_is_recovered_when_its_message_is_captured_at_once(
    make_client: ClientFactory, pg_url: str
) -> None:
    # Found by review: sequentially, in either order, the click is recovered (the event finds
    # the message's conversation, or the message the waiting event); on two replicas at once
    # each read before the other's commit, and the event stayed unlinked for good.
    first, second = await make_client(), await make_client()
    now = int(time.time())
    phone, wamid, clid = "16505559876", "wamid.first-message", "Aff-recovered-" + "x" * 40
    msg = encode(notification(messages_change([message(phone, wamid, ts=now - 5)])))
    event = {"id": wamid, "event_name": "Purchase", "timestamp": now, "ctwa_clid": clid}
    auto = encode(notification(automatic_change([event])))
    blocker = await asyncpg.connect(pg_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        # Holds both captures just before their archive row: each has done all its reading.
        await blocker.execute("LOCK TABLE webhook_notifications IN EXCLUSIVE MODE")
        on_second = asyncio.ensure_future(second.post(WEBHOOK, data=msg, headers=signed(msg)))
        await sessions_waiting_on_locks(pg_url, 1, watching=(on_second,))
        on_first = asyncio.ensure_future(first.post(WEBHOOK, data=auto, headers=signed(auto)))
        await sessions_waiting_on_locks(pg_url, 2, watching=(on_first,))
        await tx.rollback()
    finally:
        await blocker.close()
    answers = [await (await r).json() for r in (on_second, on_first)]
    assert [a["archiveStatus"] for a in answers] == ["processed", "processed"], answers
    rows = await db_rows(first, "SELECT ctwa_clid FROM conversations WHERE wa_id = ?", phone)
    linked = await db_rows(first, "SELECT conversation_id IS NOT NULL FROM automatic_events")
    assert (rows, linked) == ([(clid,)], [(True,)])


async def test_a_batch_whose_ops_all_wait_on_a_lock_fails_in_two_timeouts_not_one_per_op(
    make_client: ClientFactory, config: dict[str, Any], pg_url: str
) -> None:
    # Found by review: five notifications of one person whose row another session holds, in
    # one group commit: the batch timed out, SELECT 1 answered, and each capture was tried
    # alone, a full timeout each, while every write of the replica waited. Now the ops the
    # batch was applying when it timed out fail at once, and the others are tried alone.
    settings = parse_settings({**config, "store": {**config["store"], "command_timeout_s": 1}})
    client = await make_client(settings=settings)
    store = store_of(client)
    held = await add_conversation(store, wa_id="16505550001", clid=None)
    batches = [
        extract(
            encode(notification(messages_change([message("16505550001", f"wamid.h{i}")]))),
            settings,
            now=time.time(),
        )
        for i in range(5)
    ]
    blocker = await asyncpg.connect(pg_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", held.id)
        started = time.monotonic()
        results = await asyncio.gather(
            *(store.capture(b, window_s=86400) for b in batches),
            add_conversation(store, wa_id="16505550002"),
            return_exceptions=True,
        )
        took = time.monotonic() - started
        await tx.rollback()
    finally:
        await blocker.close()
    assert not isinstance(results[-1], BaseException), results[-1]  # the write beside them
    assert all(isinstance(r, BaseException) for r in results[:-1]), results
    assert took < 3.5, f"the writer was stuck {took:.1f} s for one held row"


class FreezingProxy:
    """TCP on loopback to PostgreSQL's Unix socket; ``frozen`` stops every byte both ways
    and leaves new connections unanswered, as a server that stopped (SIGSTOP, a cut link)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.running = asyncio.Event()
        self.running.set()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                await self.running.wait()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await self.running.wait()
        up_reader, up_writer = await asyncio.open_unix_connection(self.socket_path)
        self.writers.append(up_writer)
        for pump in (self._pump(reader, up_writer), self._pump(up_reader, writer)):
            task = asyncio.create_task(pump)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        self.running.set()
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.close()
        for t in list(self.tasks):
            t.cancel()


@pytest.fixture
async def proxy(pg_url: str) -> AsyncIterator[tuple[FreezingProxy, str]]:
    parts = urlsplit(pg_url)
    host = parse_qs(parts.query)["host"][0]
    port = parts.port or 5432
    freezing = FreezingProxy(f"{host}/.s.PGSQL.{port}")
    local = await freezing.start()
    try:
        yield freezing, f"postgresql://postgres@127.0.0.1:{local}{parts.path}"
    finally:
        await freezing.close()


async def test_a_batch_on_a_frozen_database_fails_within_its_timeout_and_the_2s_ping(
    proxy: tuple[FreezingProxy, str],
) -> None:
    # Found by review: the batch's statement timed out (4 s), SELECT 1 had two seconds, then
    # its connection, cancelled mid-query, was released, and the pool waited for the frozen
    # server to confirm the cancel, up to command_timeout more: 4 + 2 + 4 s.
    freezing, url = proxy
    store = await PostgresStore.open(url, min_connections=2, max_connections=4, command_timeout_s=4)
    try:
        await add_conversation(store, wa_id="16505550009")  # the pool is warm
        freezing.running.clear()
        started = time.monotonic()
        results = await asyncio.gather(
            add_conversation(store, wa_id="16505550010"),
            add_conversation(store, wa_id="16505550011"),
            return_exceptions=True,
        )
        took = time.monotonic() - started
        assert all(isinstance(r, BaseException) for r in results), results
        assert took < 4 + 2 + 1.5, f"a frozen database took {took:.1f} s to fail a batch"
    finally:
        freezing.running.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.close(), 15)
