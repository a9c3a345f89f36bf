"""The Store: SQLite (WAL, synchronous=FULL) through aiosqlite, and its migrations.

One connection writes, through :class:`~gateway.writer.GroupCommitWriter`; another reads, so
reads never queue behind a commit. What is stored is what delivery needs: the normalized
(hashed) Meta event, never the raw email or external id a client sent. A conversation keeps
the WhatsApp id (the phone number) because resolving by ``phoneE164`` needs it.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from gateway.domain import (
    STATUS_PRECEDENCE,
    Conversation,
    SinkState,
    StoredEvent,
    overall_status,
)
from gateway.writer import GroupCommitWriter, WriteOp

__all__ = ["MIGRATIONS", "NewEvent", "Store"]

# Append only: a released migration is never edited, a change is a new entry.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        wa_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_inbound_at REAL,
        ctwa_clid TEXT,
        ctwa_captured_at REAL,
        ctwa_clicked_at REAL,
        ctwa_source_id TEXT,
        ctwa_source_url TEXT,
        ctwa_headline TEXT,
        ctwa_source_type TEXT
    );
    CREATE INDEX conversations_by_phone
        ON conversations (account_id, wa_id, last_inbound_at DESC);
    CREATE TABLE events (
        pk INTEGER PRIMARY KEY,
        account_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        event_name TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        event_time INTEGER NOT NULL,
        status TEXT NOT NULL,
        event BLOB NOT NULL,
        test_event_code TEXT,
        received_at REAL NOT NULL,
        duration_ms REAL NOT NULL,
        insert_token TEXT NOT NULL,
        UNIQUE (account_id, event_id)
    );
    CREATE INDEX events_recent ON events (account_id, pk DESC);
    CREATE TABLE deliveries (
        event_pk INTEGER NOT NULL REFERENCES events (pk),
        sink TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        payload BLOB,
        error TEXT,
        error_code TEXT,
        trace_id TEXT,
        events_received INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL,
        PRIMARY KEY (event_pk, sink)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_open ON deliveries (sink, status) WHERE status = 'pending';
    """,
)

_CONVERSATION_COLUMNS = (
    "id, account_id, wa_id, created_at, last_inbound_at, ctwa_clid, ctwa_captured_at,"
    " ctwa_clicked_at, ctwa_source_id, ctwa_source_url, ctwa_headline, ctwa_source_type"
)
_EVENT_COLUMNS = (
    "pk, account_id, event_id, event_name, conversation_id, event_time, status, event,"
    " test_event_code, received_at, duration_ms"
)

# overall_status() in SQL: the first status in precedence order that any sink of the event has.
_STATUS_SQL = (
    "COALESCE((SELECT status FROM deliveries WHERE event_pk = ? ORDER BY CASE status "
    + " ".join(f"WHEN '{s}' THEN {i}" for i, s in enumerate(STATUS_PRECEDENCE))
    + " ELSE 99 END LIMIT 1), 'pending')"
)

_json_encode = msgspec.json.Encoder().encode
_decode_payload = msgspec.json.Decoder(dict[str, Any]).decode


def new_conversation_id() -> str:
    """Return a fresh, unguessable conversation id."""
    return "conv_" + secrets.token_hex(12)


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event about to be stored, with the state each sink starts it in."""

    account_id: str
    event_id: str
    event_name: str
    conversation_id: str
    event_time: int
    event: dict[str, Any]
    test_event_code: str | None
    received_at: float
    duration_ms: float
    deliveries: dict[str, SinkState]


class _InsertEvent(WriteOp[tuple[int, bool]]):
    """Insert an event unless its ``(account, eventId)`` exists; say which happened."""

    def __init__(self, new: NewEvent, token: str) -> None:
        self.new = new
        # Tells our row from one a concurrent request inserted first.
        self.token = token

    @classmethod
    async def apply_many(cls, conn: aiosqlite.Connection, ops: Sequence[WriteOp[Any]]) -> list[Any]:
        mine = [op for op in ops if isinstance(op, _InsertEvent)]
        now = time.time()
        await conn.executemany(
            "INSERT INTO events (account_id, event_id, event_name, conversation_id, event_time,"
            " status, event, test_event_code, received_at, duration_ms, insert_token)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (account_id, event_id) DO NOTHING",
            [
                (
                    op.new.account_id,
                    op.new.event_id,
                    op.new.event_name,
                    op.new.conversation_id,
                    op.new.event_time,
                    overall_status(op.new.deliveries),
                    _json_encode(op.new.event),
                    op.new.test_event_code,
                    op.new.received_at,
                    op.new.duration_ms,
                    op.token,
                )
                for op in mine
            ],
        )
        keys = {(op.new.account_id, op.new.event_id) for op in mine}
        found: dict[tuple[str, str], tuple[int, str]] = {}
        # One lookup for the whole batch, chunked under SQLite's variable limit.
        key_list = sorted(keys)
        for start in range(0, len(key_list), 400):
            chunk = key_list[start : start + 400]
            where = " OR ".join("(account_id = ? AND event_id = ?)" for _ in chunk)
            params = [v for key in chunk for v in key]
            found_rows = await _fetch(
                conn,
                f"SELECT account_id, event_id, pk, insert_token FROM events WHERE {where}",
                params,
            )
            for account_id, event_id, pk, token in found_rows:
                found[(account_id, event_id)] = (pk, token)
        results: list[tuple[int, bool]] = []
        rows: list[tuple[Any, ...]] = []
        for op in mine:
            pk, token = found[(op.new.account_id, op.new.event_id)]
            duplicate = token != op.token
            results.append((pk, duplicate))
            if not duplicate:
                rows.extend(
                    _delivery_row(pk, sink, state, now) for sink, state in op.new.deliveries.items()
                )
        await conn.executemany(
            "INSERT INTO deliveries (event_pk, sink, status, attempts, payload, error,"
            " error_code, trace_id, events_received, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        return results


class _InsertConversation(WriteOp[None]):
    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation

    async def apply(self, conn: aiosqlite.Connection) -> None:
        c = self.conversation
        await conn.execute(
            f"INSERT INTO conversations ({_CONVERSATION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                c.id,
                c.account_id,
                c.wa_id,
                c.created_at,
                c.last_inbound_at,
                c.ctwa_clid,
                c.ctwa_captured_at,
                c.ctwa_clicked_at,
                c.ctwa_source_id,
                c.ctwa_source_url,
                c.ctwa_headline,
                c.ctwa_source_type,
            ),
        )


class _UpdateDeliveries(WriteOp[None]):
    """Replace some sinks' states of one event and recompute the event's status."""

    def __init__(self, pk: int, states: dict[str, SinkState]) -> None:
        self.pk = pk
        self.states = states

    async def apply(self, conn: aiosqlite.Connection) -> None:
        now = time.time()
        await conn.executemany(
            "INSERT OR REPLACE INTO deliveries (event_pk, sink, status, attempts, payload, error,"
            " error_code, trace_id, events_received, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            [_delivery_row(self.pk, sink, state, now) for sink, state in self.states.items()],
        )
        await conn.execute(
            f"UPDATE events SET status = {_STATUS_SQL} WHERE pk = ?", (self.pk, self.pk)
        )


def _delivery_row(pk: int, sink: str, state: SinkState, now: float) -> tuple[Any, ...]:
    return (
        pk,
        sink,
        state.status,
        state.attempts,
        None if state.payload is None else _json_encode(state.payload),
        state.error,
        state.error_code,
        state.trace_id,
        state.events_received,
        now,
    )


class Store:
    """Conversations and events in one SQLite file."""

    def __init__(
        self,
        writer_conn: aiosqlite.Connection,
        reader_conn: aiosqlite.Connection,
        *,
        max_batch: int,
    ) -> None:
        self._reader = reader_conn
        self._writer_conn = writer_conn
        self.writer = GroupCommitWriter(writer_conn, max_batch=max_batch)
        # Insert tokens: unique per open store, without a syscall per event.
        self._token_prefix = secrets.token_hex(8)
        self._tokens = itertools.count(1)

    @classmethod
    async def open(cls, path: str | Path, *, max_batch: int = 1000) -> Store:
        """Open (creating if needed) and migrate the database, and start the writer."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await aiosqlite.connect(path, isolation_level=None)
        try:
            await writer.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is on disk (WAL fsynced) before any caller hears "accepted".
            await writer.execute("PRAGMA synchronous = FULL")
            await writer.execute("PRAGMA busy_timeout = 5000")
            await writer.execute("PRAGMA foreign_keys = ON")
            await _migrate(writer)
            reader = await aiosqlite.connect(path, isolation_level=None)
        except BaseException:
            await writer.close()
            raise
        await reader.execute("PRAGMA busy_timeout = 5000")
        await reader.execute("PRAGMA query_only = ON")
        store = cls(writer, reader, max_batch=max_batch)
        store.writer.start()
        return store

    async def close(self) -> None:
        """Flush pending writes and close both connections."""
        await self.writer.close()
        await self._reader.close()
        await self._writer_conn.close()

    # -- conversations -------------------------------------------------------------------

    async def add_conversation(self, conversation: Conversation) -> Conversation:
        """Store a new conversation (the webhook's job; tests use it directly)."""
        await self.writer.submit(_InsertConversation(conversation))
        return conversation

    async def get_conversation(self, account_id: str, conversation_id: str) -> Conversation | None:
        """Return the conversation with this id on this account."""
        rows = await _fetch(
            self._reader,
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = ? AND account_id = ?",
            (conversation_id, account_id),
        )
        return _conversation(rows[0]) if rows else None

    async def latest_conversation_for_phone(
        self, account_id: str, wa_id: str
    ) -> Conversation | None:
        """Return the most recent conversation with a click id, else the most recent one."""
        rows = await _fetch(
            self._reader,
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations"
            " WHERE account_id = ? AND wa_id = ?"
            " ORDER BY ctwa_clid IS NOT NULL DESC, COALESCE(last_inbound_at, created_at) DESC,"
            " created_at DESC LIMIT 1",
            (account_id, wa_id),
        )
        return _conversation(rows[0]) if rows else None

    # -- events ----------------------------------------------------------------------------

    async def insert_event(self, new: NewEvent) -> tuple[StoredEvent, bool]:
        """Store ``new`` unless its eventId exists; return the stored event and ``duplicate``."""
        token = f"{self._token_prefix}{next(self._tokens):x}"
        pk, duplicate = await self.writer.submit(_InsertEvent(new, token))
        if duplicate:
            existing = await self._event_by_pk(pk)
            assert existing is not None  # rows are never deleted
            return existing, True
        event = StoredEvent(
            pk=pk,
            account_id=new.account_id,
            event_id=new.event_id,
            event_name=new.event_name,
            conversation_id=new.conversation_id,
            event_time=new.event_time,
            status=overall_status(new.deliveries),
            event=new.event,
            test_event_code=new.test_event_code,
            received_at=new.received_at,
            duration_ms=new.duration_ms,
            deliveries=dict(new.deliveries),
        )
        return event, False

    async def update_deliveries(self, pk: int, states: dict[str, SinkState]) -> None:
        """Store new states for some of an event's sinks."""
        await self.writer.submit(_UpdateDeliveries(pk, states))

    async def find_event(self, account_id: str, event_id: str) -> StoredEvent | None:
        """Return the stored event with this eventId on this account."""
        rows = await _fetch(
            self._reader,
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE account_id = ? AND event_id = ?",
            (account_id, event_id),
        )
        return (await self._with_deliveries(list(rows)))[0] if rows else None

    async def recent_events(self, account_id: str, limit: int) -> list[StoredEvent]:
        """Return the account's most recent events, newest first."""
        rows = await _fetch(
            self._reader,
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE account_id = ? ORDER BY pk DESC LIMIT ?",
            (account_id, limit),
        )
        return await self._with_deliveries(list(rows))

    async def _event_by_pk(self, pk: int) -> StoredEvent | None:
        rows = await _fetch(
            self._reader, f"SELECT {_EVENT_COLUMNS} FROM events WHERE pk = ?", (pk,)
        )
        return (await self._with_deliveries(list(rows)))[0] if rows else None

    async def _with_deliveries(self, rows: list[Any]) -> list[StoredEvent]:
        if not rows:
            return []
        pks = [row[0] for row in rows]
        marks = ",".join("?" * len(pks))
        states: dict[int, dict[str, SinkState]] = {pk: {} for pk in pks}
        found = await _fetch(
            self._reader,
            "SELECT event_pk, sink, status, attempts, payload, error, error_code, trace_id,"
            f" events_received FROM deliveries WHERE event_pk IN ({marks})",
            pks,
        )
        for pk, sink, status, attempts, payload, error, code, trace, received in found:
            states[pk][sink] = SinkState(
                status=status,
                attempts=attempts,
                payload=None if payload is None else _decode_payload(payload),
                error=error,
                error_code=code,
                trace_id=trace,
                events_received=received,
            )
        return [
            StoredEvent(
                pk=row[0],
                account_id=row[1],
                event_id=row[2],
                event_name=row[3],
                conversation_id=row[4],
                event_time=row[5],
                status=row[6],
                event=_decode_payload(row[7]),
                test_event_code=row[8],
                received_at=row[9],
                duration_ms=row[10],
                deliveries=states[row[0]],
            )
            for row in rows
        ]


async def _fetch(conn: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    """Run a query and fetch every row in one trip to the connection's thread."""
    # execute_fetchall: a cursor's execute/fetch/close would be three trips.
    return list(await conn.execute_fetchall(sql, params))


def _conversation(row: Any) -> Conversation:
    return Conversation(
        id=row[0],
        account_id=row[1],
        wa_id=row[2],
        created_at=row[3],
        last_inbound_at=row[4],
        ctwa_clid=row[5],
        ctwa_captured_at=row[6],
        ctwa_clicked_at=row[7],
        ctwa_source_id=row[8],
        ctwa_source_url=row[9],
        ctwa_headline=row[10],
        ctwa_source_type=row[11],
    )


async def _migrate(conn: aiosqlite.Connection) -> None:
    await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
    async with conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") as cur:
        row = await cur.fetchone()
    current = int(row[0]) if row else 0
    for version, script in enumerate(MIGRATIONS, start=1):
        if version <= current:
            continue
        # executescript commits first; the version row goes in the same script so a crash
        # between them cannot leave a half-applied migration recorded as done.
        await conn.executescript(
            f"BEGIN IMMEDIATE; {script}; INSERT INTO schema_migrations VALUES ({version}); COMMIT;"
        )
