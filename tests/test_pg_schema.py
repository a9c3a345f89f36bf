"""The PostgreSQL schema against SQLite's: the same tables, columns and indexes; migrations
applied exactly once however many processes start together; and counts that triggers keep
the same way, checked by doing the same writes on both and comparing what they count."""

from __future__ import annotations

import asyncio
import random
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.domain import STATUS_PRECEDENCE
from gateway.store.pg_schema import MIGRATION_LOCK_KEY, PG_MIGRATIONS, migrate_pg
from gateway.store.schema import UPDATE_EVENT_STATUS, migrate
from tests.conftest import LogCapture

# How SQLite's declared column types are spelled on PostgreSQL.
_PG_TYPES = {
    "INTEGER": "bigint",
    "REAL": "double precision",
    "TEXT": "text",
    "BLOB": "bytea",
}


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def lite() -> Iterator[sqlite3.Connection]:
    # Autocommit, as the store's writer runs its own transactions; foreign keys on, as it does.
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn)
    try:
        yield conn
    finally:
        conn.close()


def _numbered(sql: str) -> str:
    """Return ``sql`` with SQLite's ``?`` placeholders numbered as PostgreSQL's ``$n``."""
    counter = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


async def _versions(conn: asyncpg.Connection) -> list[int]:
    return [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]


# -- the schema ------------------------------------------------------------------------------


async def test_migrating_an_empty_database_creates_sqlite_s_tables(
    pg: asyncpg.Connection, lite: sqlite3.Connection
) -> None:
    await migrate_pg(pg)

    tables = [
        name
        for (name,) in lite.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " ORDER BY name"
        )
    ]
    pg_tables = [
        r[0]
        for r in await pg.fetch(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' ORDER BY 1"
        )
    ]
    assert pg_tables == tables
    for table in tables:
        # (name, type, not null) in order; a primary key's columns are never null.
        expected = [
            (name, _PG_TYPES[declared], bool(notnull or pk))
            for _, name, declared, notnull, _, pk in lite.execute(f"PRAGMA table_info({table})")
        ]
        columns = await pg.fetch(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
            table,
        )
        assert [(c[0], c[1], c[2] == "NO") for c in columns] == expected, table

    # Every index SQLite was given by name (not those behind its keys and UNIQUEs).
    indexes = "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
    pg_indexes = (
        "SELECT i.indexname, i.tablename FROM pg_indexes i WHERE i.schemaname = 'public'"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
    )
    assert {tuple(r) for r in await pg.fetch(pg_indexes)} == set(lite.execute(indexes))
    triggers = "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger'"
    pg_triggers = (
        "SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " WHERE NOT t.tgisinternal"
    )
    assert {tuple(r) for r in await pg.fetch(pg_triggers)} == set(lite.execute(triggers))
    assert await _versions(pg) == list(range(1, len(PG_MIGRATIONS) + 1))


async def test_a_partial_unique_index_allows_one_live_conversation(
    pg: asyncpg.Connection,
) -> None:
    await migrate_pg(pg)
    insert = (
        "INSERT INTO conversations (id, account_id, created_at, wa_id, superseded_by)"
        " VALUES ($1, 'acme', 1, '15550001', $2)"
    )
    await pg.execute(insert, "conv_old", "conv_new")
    await pg.execute(insert, "conv_new", None)
    with pytest.raises(asyncpg.UniqueViolationError):
        await pg.execute(insert, "conv_other", None)
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute(
            "INSERT INTO conversations (id, account_id, created_at) VALUES ('c', 'acme', 1)"
        )


async def test_the_due_index_serves_a_claim_without_sorting(pg: asyncpg.Connection) -> None:
    await migrate_pg(pg)
    # An empty table would be read whole whatever its indexes: ask for the index's plan.
    await pg.execute("SET enable_seqscan = off")
    plan = "\n".join(
        r[0]
        for r in await pg.fetch(
            "EXPLAIN SELECT event_pk FROM deliveries WHERE sink = $1 AND status = 'pending'"
            " AND next_attempt_at <= $2 ORDER BY next_attempt_at, event_pk LIMIT 100",
            "meta",
            1.0,
        )
    )
    assert "deliveries_due" in plan
    assert "Sort" not in plan


# -- migrating -------------------------------------------------------------------------------


def test_the_lock_key_is_derived_from_the_name() -> None:
    # A fixed key: every release and every replica must take the same lock.
    assert MIGRATION_LOCK_KEY == -6250742880435866931


async def test_replicas_starting_together_apply_each_migration_once(
    pg_url: str, logs: LogCapture
) -> None:
    conns = [await asyncpg.connect(pg_url) for _ in range(3)]
    try:
        await asyncio.gather(*(migrate_pg(c) for c in conns))
        assert await _versions(conns[0]) == list(range(1, len(PG_MIGRATIONS) + 1))

        # A later release adds a migration that could not run twice (CREATE TABLE), and
        # counts its own runs.
        later = (
            *PG_MIGRATIONS,
            "CREATE TABLE migration_runs (n BIGINT); INSERT INTO migration_runs VALUES (1);",
        )
        await asyncio.gather(*(migrate_pg(c, migrations=later) for c in conns))
        assert await conns[1].fetchval("SELECT COUNT(*) FROM migration_runs") == 1
        assert await _versions(conns[2]) == list(range(1, len(later) + 1))

        # And an older release, still running beside it, changes nothing (a rolling
        # upgrade), but says so.
        assert not logs.events("store_schema_newer")
        await migrate_pg(conns[0])
        assert await _versions(conns[0]) == list(range(1, len(later) + 1))
        (newer,) = logs.events("store_schema_newer")
        assert (newer["version"], newer["known"]) == (len(later), len(PG_MIGRATIONS))
    finally:
        for conn in conns:
            await conn.close()


async def test_a_failing_migration_leaves_nothing_behind(pg: asyncpg.Connection) -> None:
    broken = (*PG_MIGRATIONS, "CREATE TABLE half_done (n BIGINT); SELECT 1 / 0;")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate_pg(pg, migrations=broken)
    # The migrations before it are kept; its table and its version row are not.
    assert await _versions(pg) == list(range(1, len(PG_MIGRATIONS) + 1))
    assert await pg.fetchval("SELECT to_regclass('half_done')") is None
    assert not pg.is_in_transaction()

    fixed = (*PG_MIGRATIONS, "CREATE TABLE half_done (n BIGINT);")
    await migrate_pg(pg, migrations=fixed)
    assert await _versions(pg) == list(range(1, len(fixed) + 1))


# -- counts kept by triggers -----------------------------------------------------------------

# What the insert side adds (the store counts a batch in Python, as gateway.store.reports
# and gateway.store.outbox do on SQLite). Qualified with the table: on PostgreSQL a bare
# `events` in DO UPDATE SET is ambiguous between the row and `excluded`.
_ADD_TO_HOURS = (
    "INSERT INTO event_hours (account_id, hour, event_name, status, currency, expired, events,"
    " value) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (account_id, hour, event_name, status, currency, expired) DO UPDATE SET"
    " events = event_hours.events + excluded.events, value = event_hours.value + excluded.value"
)
_ADD_TO_DELIVERIES = (
    "INSERT INTO delivery_counts (account_id, sink, status, deliveries) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (account_id, sink, status) DO UPDATE SET"
    " deliveries = delivery_counts.deliveries + excluded.deliveries"
)
_INSERT_EVENT = (
    "INSERT INTO events (pk, account_id, event_id, event_name, conversation_id, event_time,"
    " status, event, received_at, duration_ms, insert_token, attribution_window_expired,"
    " custom_value, custom_currency) VALUES (?, ?, ?, ?, 'conv_1', ?, ?, ?, 0, 0, '', ?, ?, ?)"
)
_INSERT_DELIVERY = (
    "INSERT INTO deliveries (event_pk, sink, status, updated_at, next_attempt_at)"
    " VALUES (?, ?, ?, 0, 0)"
)
# The store's upsert of a delivery's state: an existing row is updated, firing the trigger.
_UPSERT_DELIVERY = (
    f"{_INSERT_DELIVERY} ON CONFLICT (event_pk, sink) DO UPDATE SET"
    " status = excluded.status, attempts = deliveries.attempts + 1"
)

_SINKS = ("meta", "crm")
_STATUSES = ("pending", *(s for s in STATUS_PRECEDENCE if s != "pending"))


class Both:
    """The same statements on a SQLite and a PostgreSQL database migrated the same way."""

    def __init__(self, lite: sqlite3.Connection, pg: asyncpg.Connection) -> None:
        self.lite = lite
        self.pg = pg
        self.events: dict[int, str] = {}  # pk -> account
        self.deliveries: set[tuple[int, str]] = set()  # (event pk, sink)

    async def run(self, sql: str, *params: Any) -> None:
        self.lite.execute(sql, params)
        await self.pg.execute(_numbered(sql), *params)

    async def insert_event(
        self,
        account: str,
        status: str,
        *,
        event_time: int,
        name: str = "Purchase",
        value: float | None = None,
        currency: str | None = None,
        expired: int = 0,
    ) -> int:
        """Insert an event and count it, as the store's insert does; return its pk."""
        # The test picks pks: SQLite may reuse a deleted largest one, an identity never does.
        pk = max(self.events, default=0) + 1
        event = (pk, account, f"evt-{pk}", name, event_time, status, b"{}", expired)
        await self.run(_INSERT_EVENT, *event, value, currency)
        hours = (account, event_time // 3600, name, status, currency or "", expired)
        await self.run(_ADD_TO_HOURS, *hours, 1, value or 0.0)
        self.events[pk] = account
        return pk

    async def insert_delivery(self, pk: int, sink: str, status: str) -> None:
        """Insert a delivery and count it, as the store's insert does."""
        await self.run(_INSERT_DELIVERY, pk, sink, status)
        await self.run(_ADD_TO_DELIVERIES, self.events[pk], sink, status, 1)
        self.deliveries.add((pk, sink))

    async def prune(self, pk: int) -> None:
        """Delete an event and its deliveries, in retention's order."""
        await self.run("DELETE FROM deliveries WHERE event_pk = ?", pk)
        await self.run("DELETE FROM events WHERE pk = ?", pk)
        del self.events[pk]
        self.deliveries = {d for d in self.deliveries if d[0] != pk}

    async def assert_same_counts(self) -> None:
        for table, (every, _) in _COUNTS.items():
            assert _comparable(await self.pg.fetch(every)) == _comparable(
                self.lite.execute(every).fetchall()
            ), table

    async def counts(self, table: str) -> list[tuple[Any, ...]]:
        """Return a count table's rows that count something, the same on both databases."""
        await self.assert_same_counts()
        return _comparable(self.lite.execute(_COUNTS[table][1]).fetchall())


# Each count table's rows, and those that count something, in key order.
_COUNTS = {
    "event_hours": (
        "SELECT * FROM event_hours ORDER BY 1, 2, 3, 4, 5, 6",
        "SELECT * FROM event_hours WHERE events != 0 ORDER BY 1, 2, 3, 4, 5, 6",
    ),
    "delivery_counts": (
        "SELECT * FROM delivery_counts ORDER BY 1, 2, 3",
        "SELECT * FROM delivery_counts WHERE deliveries != 0 ORDER BY 1, 2, 3",
    ),
}


def _comparable(rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    # A sum of floats depends on the order rows were added in, which a multi-row statement
    # may visit differently on each database: compare values to the micro-unit.
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]


@pytest.fixture
async def both(lite: sqlite3.Connection, pg: asyncpg.Connection) -> Both:
    await migrate_pg(pg)
    return Both(lite, pg)


async def test_inserts_are_counted_by_the_store_not_by_triggers(both: Both) -> None:
    await both.run(_INSERT_EVENT, 1, "acme", "e1", "Purchase", 3600, "pending", b"{}", 0, 5, None)
    await both.run(_INSERT_DELIVERY, 1, "meta", "pending")
    assert await both.counts("event_hours") == []
    assert await both.counts("delivery_counts") == []


async def test_status_changes_and_pruning_move_the_counts(both: Both) -> None:
    hour = 7200
    first = await both.insert_event(
        "acme", "pending", event_time=hour + 5, value=49.99, currency="USD"
    )
    second = await both.insert_event("acme", "pending", event_time=hour + 9, value=10.0)
    for pk in (first, second):
        await both.insert_delivery(pk, "meta", "pending")
    await both.insert_delivery(first, "crm", "pending")
    assert await both.counts("event_hours") == [
        ("acme", 2, "Purchase", "pending", "", 0, 1, 10.0),
        ("acme", 2, "Purchase", "pending", "USD", 0, 1, 49.99),
    ]
    assert await both.counts("delivery_counts") == [
        ("acme", "crm", "pending", 1),
        ("acme", "meta", "pending", 2),
    ]

    # A delivery fails; the event's status follows, through the store's own statement.
    await both.run(
        "UPDATE deliveries SET status = 'failed' WHERE event_pk = ? AND sink = 'meta'", first
    )
    await both.run(UPDATE_EVENT_STATUS, first, first)
    # Writing a status a row already has, or other columns only, moves nothing.
    await both.run("UPDATE deliveries SET status = 'pending' WHERE event_pk = ?", second)
    await both.run("UPDATE deliveries SET attempts = attempts + 1")
    await both.run(UPDATE_EVENT_STATUS, second, second)
    assert await both.counts("event_hours") == [
        ("acme", 2, "Purchase", "failed", "USD", 0, 1, 49.99),
        ("acme", 2, "Purchase", "pending", "", 0, 1, 10.0),
    ]
    assert await both.counts("delivery_counts") == [
        ("acme", "crm", "pending", 1),
        ("acme", "meta", "failed", 1),
        ("acme", "meta", "pending", 1),
    ]

    # The store's upsert of an existing delivery is an update too.
    await both.run(_UPSERT_DELIVERY, second, "meta", "delivered")
    await both.run(UPDATE_EVENT_STATUS, second, second)
    assert ("acme", "meta", "delivered", 1) in await both.counts("delivery_counts")
    assert ("acme", 2, "Purchase", "delivered", "", 0, 1, 10.0) in await both.counts("event_hours")

    # Retention: what is pruned counts nowhere.
    await both.prune(first)
    assert await both.counts("event_hours") == [
        ("acme", 2, "Purchase", "delivered", "", 0, 1, 10.0)
    ]
    assert await both.counts("delivery_counts") == [("acme", "meta", "delivered", 1)]


async def test_test_events_are_counted_nowhere(both: Both) -> None:
    # Sent with a test event code: Meta counts them nowhere, and neither do the stats. The
    # insert leaves them out (gateway.store.reports); a status change or a prune moves
    # nothing either.
    await both.run(
        "INSERT INTO events (pk, account_id, event_id, event_name, conversation_id, event_time,"
        " status, event, test_event_code, received_at, duration_ms, insert_token,"
        " custom_value, custom_currency)"
        " VALUES (1, 'acme', 'evt-1', 'Purchase', 'conv_1', 7200, 'pending', ?, 'TEST1', 0, 0,"
        " '', 99.0, 'USD')",
        b"{}",
    )
    both.events[1] = "acme"
    await both.insert_delivery(1, "meta", "pending")
    real = await both.insert_event("acme", "pending", event_time=7205, value=10.0)
    await both.insert_delivery(real, "meta", "pending")
    await both.run("UPDATE deliveries SET status = 'delivered'")
    for pk in (1, real):
        await both.run(UPDATE_EVENT_STATUS, pk, pk)
    assert await both.counts("event_hours") == [
        ("acme", 2, "Purchase", "delivered", "", 0, 1, 10.0)
    ]
    # Deliveries are counted as they are: /metrics counts what was sent, tests included.
    assert await both.counts("delivery_counts") == [("acme", "meta", "delivered", 2)]
    await both.prune(1)
    assert await both.counts("event_hours") == [
        ("acme", 2, "Purchase", "delivered", "", 0, 1, 10.0)
    ]


async def test_upgrading_takes_test_events_out_of_the_counts(pg: asyncpg.Connection) -> None:
    # A database at the version before, whose counts included a test event.
    before = PG_MIGRATIONS[:3]
    await migrate_pg(pg, migrations=before)
    for pk, code, value in ((1, None, 12.5), (2, "TEST9", 100.0)):
        await pg.execute(
            "INSERT INTO events (pk, account_id, event_id, event_name, conversation_id,"
            " event_time, status, event, test_event_code, received_at, duration_ms,"
            " insert_token, custom_value, custom_currency) VALUES ($1, 'acme', $2, 'Purchase',"
            " 'conv_1', 7260, 'delivered', '\\x7b7d', $3, 0, 0, '', $4, 'EUR')",
            pk,
            f"evt-{pk}",
            code,
            value,
        )
    await pg.execute(
        "INSERT INTO event_hours VALUES ('acme', 2, 'Purchase', 'delivered', 'EUR', 0, 2, 112.5)"
    )
    await migrate_pg(pg)
    assert [tuple(r) for r in await pg.fetch("SELECT * FROM event_hours")] == [
        ("acme", 2, "Purchase", "delivered", "EUR", 0, 1, 12.5)
    ]
    # And from now on a test event's deletion takes nothing away.
    await pg.execute("DELETE FROM events WHERE pk = 2")
    assert [tuple(r) for r in await pg.fetch("SELECT events FROM event_hours")] == [(1,)]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_writes_count_the_same_on_both(both: Both, seed: int) -> None:
    rng = random.Random(seed)
    accounts = ("acme", "beta")
    for _ in range(120):
        live = sorted(both.events)
        pairs = sorted(both.deliveries)
        step = rng.randrange(8) if live else 0
        if step == 0:
            pk = await both.insert_event(
                rng.choice(accounts),
                rng.choice(_STATUSES),
                event_time=rng.randrange(4) * 3600 + rng.randrange(3600),
                name=rng.choice(("Purchase", "LeadSubmitted")),
                value=rng.choice((None, 0.0, 0.1, 49.99, 10.0)),
                currency=rng.choice((None, "USD", "EUR")),
                expired=rng.randrange(2),
            )
            for sink in _SINKS:
                if rng.random() < 0.7:
                    await both.insert_delivery(pk, sink, "pending")
        elif step == 1 and pairs:
            pk, sink = rng.choice(pairs)
            await both.run(
                "UPDATE deliveries SET status = ? WHERE event_pk = ? AND sink = ?",
                rng.choice(_STATUSES),
                pk,
                sink,
            )
            await both.run(UPDATE_EVENT_STATUS, pk, pk)
        elif step == 2:
            pk = rng.choice(live)
            sink = rng.choice(_SINKS)
            status = rng.choice(_STATUSES)
            if (pk, sink) in both.deliveries:
                await both.run(_UPSERT_DELIVERY, pk, sink, status)
            else:
                await both.insert_delivery(pk, sink, status)
        elif step == 3:
            await both.run(
                "UPDATE events SET status = ? WHERE pk = ?", rng.choice(_STATUSES), rng.choice(live)
            )
        elif step == 4:
            # Many rows in one statement, several landing on the same counts.
            await both.run(
                "UPDATE events SET status = ? WHERE account_id = ?",
                rng.choice(_STATUSES),
                rng.choice(accounts),
            )
        elif step == 5:
            await both.run(
                "UPDATE deliveries SET status = ? WHERE sink = ?",
                rng.choice(_STATUSES),
                rng.choice(_SINKS),
            )
        elif step == 6 and pairs:
            pk, sink = rng.choice(pairs)
            await both.run("DELETE FROM deliveries WHERE event_pk = ? AND sink = ?", pk, sink)
            both.deliveries.discard((pk, sink))
        elif step == 7:
            await both.prune(rng.choice(live))
        await both.assert_same_counts()

    # And the counts are right, not merely alike: the live rows, counted from scratch.
    hours = both.lite.execute(
        "SELECT account_id, event_time / 3600, event_name, status, COALESCE(custom_currency, ''),"
        " attribution_window_expired, COUNT(*), COALESCE(SUM(custom_value), 0) FROM events"
        " GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6"
    ).fetchall()
    assert await both.counts("event_hours") == _comparable(hours)
    deliveries = both.lite.execute(
        "SELECT e.account_id, d.sink, d.status, COUNT(*) FROM deliveries d"
        " JOIN events e ON e.pk = d.event_pk GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    ).fetchall()
    assert await both.counts("delivery_counts") == _comparable(deliveries)


async def test_an_older_replicas_test_events_stay_counted_until_the_readme_recount(
    pg: asyncpg.Connection,
) -> None:
    # Found by review: in a rolling upgrade, a replica still on the version before counts
    # the test events it stores (its insert adds every event to event_hours), and the new
    # triggers never take them away, not even when retention deletes them. The README says
    # so and gives the statements that count the hours again; they must be exact.
    await migrate_pg(pg)
    for pk, code, value in ((1, None, 12.5), (2, "TEST9", 100.0)):
        await pg.execute(
            "INSERT INTO events (pk, account_id, event_id, event_name, conversation_id,"
            " event_time, status, event, test_event_code, received_at, duration_ms,"
            " insert_token, custom_value, custom_currency) VALUES ($1, 'acme', $2, 'Purchase',"
            " 'conv_1', 7260, 'pending', '\\x7b7d', $3, 0, 0, '', $4, 'EUR')",
            pk,
            f"evt-{pk}",
            code,
            value,
        )
        # As the older replica's insert counts each.
        await pg.execute(
            _numbered(_ADD_TO_HOURS), "acme", 2, "Purchase", "pending", "EUR", 0, 1, value
        )
    await pg.execute("DELETE FROM events WHERE pk = 2")  # pruned: still counted
    counted = "SELECT events, value FROM event_hours WHERE events != 0"
    assert [tuple(r) for r in await pg.fetch(counted)] == [(2, 112.5)]
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    after = readme[readme.index("count the hours again from the events") :]
    recount = after[after.index("```sql\n") + 7 : after.index("```", after.index("```sql") + 6)]
    await pg.execute(recount)
    assert [tuple(r) for r in await pg.fetch(counted)] == [(1, 12.5)]
