"""The store: group commit, durability, duplicates and migrations, on a real SQLite file and on
a PostgreSQL database."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from gateway.config import parse_settings
from gateway.domain import Resolution, SinkState, StoredEvent
from gateway.errors import ConfigError
from gateway.store import database
from gateway.store.database import SqliteStore, Store, StoreMissing
from gateway.store.engines import open_store
from gateway.store.schema import MIGRATIONS
from gateway.store.schema import migrate as schema_migrate
from gateway.wire import ConversionRequest, sha256_fingerprint
from tests.conftest import (
    AUTH,
    CLID,
    ENV,
    ClientFactory,
    LogCapture,
    add_conversation,
    db_rows,
    event_detail,
    store_of,
)
from tests.store_sql import db_execute

# Run on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_ENGINES = True


@pytest.fixture
async def store(config: dict[str, Any]) -> AsyncIterator[Store]:
    """A store of its own, without an app: the SQLite file, or a fresh PostgreSQL database."""
    opened = await open_store(parse_settings(config), ENV)
    yield opened
    await opened.close()


def new_event(event_id: str, account_id: str = "acme", status: str = "dry_run") -> StoredEvent:
    return StoredEvent(
        pk=0,
        status="pending",
        account_id=account_id,
        event_id=event_id,
        event_name="Purchase",
        conversation_id="conv_1",
        event_time=int(time.time()),
        event={"event_name": "Purchase", "event_id": event_id},
        test_event_code=None,
        received_at=time.time(),
        duration_ms=1.0,
        deliveries={"log": SinkState(status=status, payload={"data": [event_id]})},  # type: ignore[arg-type]
    )


async def test_concurrent_writes_share_transactions(store: Store) -> None:
    results = await asyncio.gather(*(store.insert_event(new_event(f"e{i}")) for i in range(500)))
    assert all(not duplicate for _, duplicate in results)
    assert len({event.pk for event, _ in results}) == 500
    # Group commit: far fewer transactions than writes.
    assert store.writer.ops == 500
    assert store.writer.batches < 50


async def test_committed_events_survive_reopen(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    await asyncio.gather(*(store.insert_event(new_event(f"e{i}")) for i in range(50)))
    await store.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (50,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    again = await SqliteStore.open(db_path)
    try:
        found = await again.find_event("acme", "e7")
        assert found is not None
        assert found.deliveries["log"].payload == {"data": ["e7"]}
    finally:
        await again.close()


async def test_the_writer_keeps_statement_journals_in_memory_but_migrates_on_disk(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A group commit's INSERT of many rows keeps a statement journal; on disk it spilled to a
    # temporary file created and unlinked on about every commit of a busy store. A migration
    # building an index over millions of old rows must still sort on disk, not in memory.
    during: list[tuple[int]] = []

    def migrate(conn: sqlite3.Connection) -> None:
        during.append(conn.execute("PRAGMA temp_store").fetchone())
        schema_migrate(conn)

    monkeypatch.setattr(database, "migrate", migrate)
    store = await SqliteStore.open(db_path)
    try:
        assert during == [(0,)]  # DEFAULT: a file when large
        assert store._writer_conn.execute("PRAGMA temp_store").fetchone() == (2,)  # MEMORY
    finally:
        await store.close()


async def test_the_newest_events_come_from_an_index_new_events_are_appended_to(
    db_path: Path,
) -> None:
    store = await SqliteStore.open(db_path)
    await store.close()
    conn = sqlite3.connect(db_path)
    plan = " ".join(
        row[3]
        for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT pk FROM events WHERE account_id = ? ORDER BY pk DESC"
            " LIMIT 5",
            ("acme",),
        )
    )
    assert "events_recent" in plan
    assert "TEMP B-TREE" not in plan
    # Ascending: each new event goes at the index's end. In descending order every one went
    # in at the front, where a B-tree splits pages in half: four pages written per group
    # commit instead of one or two, and 40% more pages than the entries fill.
    assert [row[3] for row in conn.execute("PRAGMA index_xinfo(events_recent)")][:2] == [0, 0]
    conn.close()


async def test_duplicate_in_one_batch_returns_the_first(store: Store) -> None:
    a, b = await asyncio.gather(
        store.insert_event(new_event("same")), store.insert_event(new_event("same"))
    )
    assert sorted([a[1], b[1]]) == [False, True]
    assert a[0].pk == b[0].pk


async def test_a_failing_write_does_not_fail_its_batch(store: Store, engine: str) -> None:
    # A sink state the schema refuses (NOT NULL status) makes only this write fail.
    broken = SinkState(status=None)  # type: ignore[arg-type]
    bad = msgspec.structs.replace(new_event("bad"), deliveries={"log": broken})
    results = await asyncio.gather(
        store.insert_event(new_event("ok1")),
        store.insert_event(bad),
        store.insert_event(new_event("ok2")),
        return_exceptions=True,
    )
    refused = sqlite3.IntegrityError if engine == "sqlite" else asyncpg.NotNullViolationError
    assert isinstance(results[1], refused)
    assert not isinstance(results[0], BaseException)
    assert not isinstance(results[2], BaseException)
    assert await store.find_event("acme", "ok1") is not None
    assert await store.find_event("acme", "ok2") is not None
    assert await store.find_event("acme", "bad") is None


async def test_update_deliveries_recomputes_status(store: Store) -> None:
    event, _ = await store.insert_event(new_event("e", status="pending"))
    assert event.status == "pending"
    await store.update_deliveries(event.pk, {"log": SinkState(status="delivered", trace_id="T")})
    found = await store.find_event("acme", "e")
    assert found is not None
    assert found.status == "delivered"
    assert found.deliveries["log"].trace_id == "T"
    await store.update_deliveries(event.pk, {"meta": SinkState(status="failed", error="x")})
    found = await store.find_event("acme", "e")
    assert found is not None
    assert found.status == "failed"


async def test_an_event_stores_its_sinks_worst_status(store: Store) -> None:
    """One sink's state is the event's (an unknown one counts as pending); of several, the
    one needing attention first."""
    cases = [
        ({"log": "dry_run"}, "dry_run"),
        ({"log": "made-up"}, "pending"),
        ({"log": "dry_run", "meta": "delivered"}, "delivered"),
        ({"log": "dry_run", "meta": "pending", "crm": "failed"}, "failed"),
        ({"meta": "expired", "crm": "delivered"}, "expired"),
        ({"log": "made-up", "meta": "delivered"}, "delivered"),
    ]
    for i, (statuses, expected) in enumerate(cases):
        new = msgspec.structs.replace(
            new_event(f"WORST-{i}"),
            deliveries={sink: SinkState(status=s) for sink, s in statuses.items()},  # type: ignore[arg-type]
        )
        stored, _ = await store.insert_event(new)
        assert stored.status == expected, statuses
        found = await store.find_event("acme", f"WORST-{i}")
        assert found is not None
        assert found.status == expected, statuses


async def test_migrations_run_once(db_path: Path) -> None:
    for _ in range(2):
        store = await SqliteStore.open(db_path)
        await store.close()
    with sqlite3.connect(db_path) as conn:
        versions = conn.execute("SELECT version FROM schema_migrations").fetchall()
    assert versions == [(i + 1,) for i in range(len(MIGRATIONS))]


async def test_a_store_a_newer_version_migrated_is_refused_in_one_line(db_path: Path) -> None:
    """A binary rolled back after an upgrade would write rows without the newer columns and
    skip their triggers; it stops at start-up, saying what to do, before touching a row."""
    store = await SqliteStore.open(db_path)
    await store.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (?)", (len(MIGRATIONS) + 1,))
    before = db_path.read_bytes()
    with pytest.raises(ConfigError, match=rf"{db_path}: .*schema version {len(MIGRATIONS) + 1}"):
        await SqliteStore.open(db_path)
    assert db_path.read_bytes() == before


async def test_phone_lookup_prefers_clicks_then_recency(store: Store) -> None:
    now = time.time()
    await add_conversation(store, clid="a", last_inbound_at=now - 100, superseded_by="conv_b")
    b = await add_conversation(store, clid="b", last_inbound_at=now - 10, superseded_by="conv_c")
    await add_conversation(store, clid=None, last_inbound_at=now)
    (best, *rest) = await store.conversations_for_phones("acme", ["16505551234"])
    assert (best.conversation, best.matched, best.former, len(rest)) == (b, "16505551234", False, 2)
    assert await store.conversations_for_phones("other", ["16505551234"]) == []


async def test_writes_after_close_are_refused(config: dict[str, Any]) -> None:
    store = await open_store(parse_settings(config), ENV)
    await store.close()
    with pytest.raises(RuntimeError, match="not running"):
        await store.insert_event(new_event("late"))


async def test_conversations_are_found_by_id_within_their_account(store: Store) -> None:
    made = [await add_conversation(store, wa_id=f"1650555{i:04d}") for i in range(5)]
    found = await asyncio.gather(*(store.get_conversation("acme", c.id) for c in made))
    assert found == made
    # A missing id, and an id asked for under the wrong account, answer None.
    none = await asyncio.gather(
        store.get_conversation("acme", "conv_missing"), store.get_conversation("other", made[0].id)
    )
    assert list(none) == [None, None]


async def test_old_webhook_message_ids_are_pruned(store: Store) -> None:
    from gateway.capture.records import CaptureBatch, InboundMessage

    batch = CaptureBatch(
        messages=[
            InboundMessage(
                path=f"$.entry[0].changes[0].value.messages[{i}]", account_id="acme",
                phone="16505550001", wamid=f"wamid.{i}", timestamp=1.0,
            )
            for i in range(25)
        ]
    )  # fmt: skip
    await store.capture(batch, window_s=604800)
    assert await store.prune_messages(time.time() - 60) == 0  # received just now: kept
    # A small batch per transaction (found by review: a million ids were one DELETE, which
    # held every conversion's commit for seconds).
    transactions = store.writer.ops
    assert await store.prune_messages(time.time() + 60, batch_rows=10) == 25
    assert store.writer.ops - transactions == 3
    # Forgotten ids are new again: the conversation is still the same one.
    again = await store.capture(batch, window_s=604800)
    assert (again.messages, again.conversations_created) == (25, 0)


async def test_store_files_are_private_to_the_service_user(tmp_path: Path) -> None:
    db = tmp_path / "var" / "gateway.sqlite3"
    store = await SqliteStore.open(db)
    await add_conversation(store)  # writes the WAL
    try:
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
        for file in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    finally:
        await store.close()


async def test_a_store_readable_by_others_is_warned_about(tmp_path: Path, logs: LogCapture) -> None:
    db = tmp_path / "gateway.sqlite3"
    db.touch(mode=0o644)
    db.chmod(0o644)
    store = await SqliteStore.open(db)
    await store.close()
    (line,) = logs.events("store_file_not_private")
    assert (line["path"], line["mode"], line["fix"]) == (str(db), "0o644", f"chmod 600 {db}")


async def test_a_store_that_must_exist_is_never_created(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "gateway.sqlite3"
    with pytest.raises(StoreMissing, match="no store at"):
        await SqliteStore.open(missing, create=False)
    assert not missing.parent.exists()


async def test_events_stored_by_earlier_versions_read_and_compare_as_written(
    make_client: ClientFactory,
) -> None:
    """Rows written before the compact format (the whole Meta event, its copy in the sink's
    payload, SHA-256 request digests, the resolution as an object) read back unchanged, and
    a retry of one is still told apart from a reuse of its eventId."""
    client = await make_client()
    conversation = await add_conversation(store_of(client))
    body = {
        "accountId": "acme",
        "eventName": "Purchase",
        "eventId": "OLD-1",
        "conversationId": conversation.id,
        "value": 5.0,
        "currency": "USD",
    }
    now = int(time.time())
    event = {
        "event_name": "Purchase",
        "event_id": "OLD-1",
        "action_source": "business_messaging",
        "messaging_channel": "whatsapp",
        "event_time": now,
        "user_data": {"whatsapp_business_account_id": "102290129340398", "ctwa_clid": CLID},
        "custom_data": {"currency": "USD", "value": 5.0},
    }
    payload = {"data": [event], "partner_agent": "ctwa-gateway"}
    resolution = {"resolver": "conversation_id", "field": "conversationId"}
    fingerprint = sha256_fingerprint(msgspec.json.decode(json.dumps(body), type=ConversionRequest))
    # As version 0.6 wrote them.
    await db_execute(
        client,
        "INSERT INTO events (account_id, event_id, event_name, conversation_id, event_time,"
        " status, event, received_at, duration_ms, insert_token, resolution, request_fields)"
        " VALUES ('acme', 'OLD-1', 'Purchase', ?, ?, 'dry_run', ?, ?, 1.0, 'tok', ?, ?)",
        conversation.id,
        now,
        json.dumps(event).encode(),
        float(now),
        json.dumps(resolution).encode(),
        json.dumps(fingerprint).encode(),
    )
    ((pk,),) = await db_rows(client, "SELECT pk FROM events WHERE event_id = 'OLD-1'")
    await db_execute(
        client,
        "INSERT INTO deliveries (event_pk, sink, status, attempts, payload, events_received,"
        " updated_at) VALUES (?, 'log', 'dry_run', 0, ?, 0, ?)",
        pk,
        json.dumps(payload).encode(),
        float(now),
    )

    detail = await event_detail(client, "OLD-1")
    assert detail["event"] == event
    stored = await store_of(client).find_event("acme", "OLD-1")
    assert stored is not None
    assert stored.deliveries["log"].payload == payload
    assert detail["resolution"]["resolver"] == "conversation_id"
    retry = await client.post("/v1/whatsapp/conversions", json=body, headers=AUTH)
    assert retry.status == 200, await retry.text()
    assert (await retry.json())["duplicate"] is True
    reuse = await client.post("/v1/whatsapp/conversions", json={**body, "value": 6.0}, headers=AUTH)
    answer = await reuse.json()
    assert reuse.status == 409, answer
    assert answer["param"] == "value"


async def test_a_stored_event_and_its_payload_read_back_exactly(store: Store) -> None:
    """The compact row (event fields left out, the payload referring to the event) reads
    back as the event and payload that were stored."""
    event: dict[str, Any] = {
        "event_name": "Purchase",
        "event_id": "NEW-1",
        "action_source": "business_messaging",
        "messaging_channel": "whatsapp",
        "event_time": 1_790_000_000,
        "user_data": {"whatsapp_business_account_id": "1", "ctwa_clid": "c"},
        "custom_data": {"currency": "USD", "value": 1.5},
    }
    other = {**event, "event_id": "NEW-2", "action_source": "other", "event_time": 1_790_000_001}
    # custom_data is left out when the reporting columns hold it: an integer value stays one,
    # and one with more keys, or without a value, is stored as it is.
    whole = {**event, "event_id": "NEW-3", "custom_data": {"currency": "EUR", "value": 20}}
    more = {**event, "event_id": "NEW-4", "custom_data": {"currency": "EUR", "value": 2.5}}
    more["custom_data"]["content_ids"] = ["sku-1"]
    no_value = {**event, "event_id": "NEW-5", "custom_data": {"currency": "EUR"}}
    for body in (event, other, whole, more, no_value):
        event_id = str(body["event_id"])
        payload = {"data": [body], "partner_agent": "p", "test_event_code": "TEST1"}
        new = msgspec.structs.replace(
            new_event(event_id),
            event=body,
            event_time=body["event_time"],
            deliveries={"log": SinkState(status="dry_run", payload=payload)},
        )
        await store.insert_event(new)
        found = await store.find_event("acme", event_id)
        assert found is not None
        assert found.event == body
        assert list(found.event) == list(body)  # the order Meta is shown, too
        assert found.deliveries["log"].payload == payload


async def test_request_fields_read_back_exactly_whatever_their_shape(store: Store) -> None:
    """CRC fingerprints are packed into bytes (in any order they come); anything else (a
    field the packing does not know, digits that are not 8 lowercase hex ones) is kept as
    it is."""
    shapes = [
        {"eventName": "0011aabb", "phoneE164": "12345678", "value": "deadbeef"},
        {"value": "deadbeef", "eventName": "0011aabb"},
        {"eventName": "0011aabb", "somethingNew": "12345678"},
        {"eventName": "zzzzzzzz"},
        {"eventName": "00 11 aa", "value": "deadbeef"},
        {"eventName": "0011AABB"},
        {"eventName": "0011aabb", "value": "0123456789abcdef"},
        {},
    ]
    for i, fields in enumerate(shapes):
        await store.insert_event(
            msgspec.structs.replace(new_event(f"FIELDS-{i}"), request_fields=fields)
        )
        found = await store.find_event("acme", f"FIELDS-{i}")
        assert found is not None
        assert found.request_fields == fields


async def test_how_an_event_was_resolved_reads_back_exactly(store: Store) -> None:
    """The resolution is stored as a short list (``ambiguous`` only when set)."""
    for i, ambiguous in enumerate((False, True)):
        resolution = Resolution(
            resolver="phone", field="phoneE164", form="without_trunk_zero", ambiguous=ambiguous
        )
        await store.insert_event(
            msgspec.structs.replace(new_event(f"RES-{i}"), resolution=resolution)
        )
        found = await store.find_event("acme", f"RES-{i}")
        assert found is not None
        assert found.resolution == resolution
