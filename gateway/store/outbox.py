"""The outbox: pending deliveries as the store holds them, for sinks that deliver later.

An accepted event's delivery row is committed with status ``pending`` (and due at once) in the
same transaction as the event. A dispatcher asks :meth:`Outbox.due` for work, sends it, and
records each outcome with :meth:`Outbox.record` (one transaction per batch, with one attempt
row per event). Nothing here knows about any one sink.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import aiosqlite
import msgspec

from gateway.domain import Attempt, QueuedEvent, SinkState
from gateway.store.rows import QUEUED_COLUMNS, queued_from_row
from gateway.store.schema import UPDATE_EVENT_STATUS, fetch_rows, select
from gateway.store.writer import GroupCommitWriter, WriteOp

__all__ = ["AttemptResult", "EventsWhere", "Outbox", "count_deliveries"]

_COUNT_DELIVERIES = (
    "INSERT INTO delivery_counts (account_id, sink, status, deliveries) VALUES (?, ?, ?, ?)"
    " ON CONFLICT DO UPDATE SET deliveries = deliveries + excluded.deliveries"
)


def count_deliveries(conn: sqlite3.Connection, added: Sequence[tuple[str, str, str]]) -> None:
    """Add new deliveries rows, as (account, sink, status), to ``delivery_counts`` in the
    transaction that writes them (triggers follow their status changes and deletions)."""
    tallies: dict[tuple[str, str, str], int] = {}
    for key in added:
        tallies[key] = tallies.get(key, 0) + 1
    if tallies:
        conn.executemany(_COUNT_DELIVERIES, [(*key, n) for key, n in tallies.items()])


_encode = msgspec.json.Encoder().encode


class AttemptResult(msgspec.Struct, frozen=True, kw_only=True):
    """The new state of one delivery after one attempt, and that attempt's record."""

    pk: int
    state: SinkState
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    # When to try again (status pending); None for a final state.
    next_attempt_at: float | None = None


class _Record(WriteOp[None]):
    inline = True

    def __init__(self, sink: str, results: Sequence[AttemptResult]) -> None:
        self.sink = sink
        self.results = results

    def apply(self, conn: sqlite3.Connection) -> None:
        now = time.time()
        conn.executemany(
            "UPDATE deliveries SET status = ?, attempts = ?, error = ?, error_code = ?,"
            " trace_id = ?, events_received = ?, warnings = ?, next_attempt_at = ?,"
            " updated_at = ? WHERE event_pk = ? AND sink = ? AND error_code IS NOT 'erased'",
            [
                (
                    r.state.status,
                    r.state.attempts,
                    r.state.error,
                    r.state.error_code,
                    r.state.trace_id,
                    r.state.events_received,
                    None if r.state.warnings is None else _encode(r.state.warnings),
                    r.next_attempt_at,
                    now,
                    r.pk,
                    self.sink,
                )
                for r in self.results
            ],
        )
        conn.executemany(
            "INSERT OR REPLACE INTO delivery_attempts (event_pk, sink, attempt, at, outcome,"
            " http_status, error_code, message, trace_id, batch_size, duration_ms)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    r.pk,
                    self.sink,
                    a.attempt,
                    a.at,
                    a.outcome,
                    a.http_status,
                    a.error_code,
                    a.message,
                    a.trace_id,
                    a.batch_size,
                    a.duration_ms,
                )
                for r in self.results
                for a in r.attempts
            ],
        )
        conn.executemany(UPDATE_EVENT_STATUS, [(r.pk, r.pk) for r in self.results])


# Which events to replay: a condition on the events table's columns, and its parameters.
EventsWhere = tuple[str, Sequence[Any]]


def _requeueable(
    sinks: Sequence[str], statuses: Sequence[str], events: EventsWhere
) -> tuple[str, list[Any]]:
    """The deliveries a replay makes pending again (a WHERE on deliveries)."""
    sink_marks = ",".join("?" * len(sinks))
    status_marks = ",".join("?" * len(statuses))
    # An erased person's deliveries stay cancelled, whatever is replayed.
    where = (
        f"sink IN ({sink_marks}) AND status IN ({status_marks})"
        f" AND error_code IS NOT 'erased' AND event_pk IN (SELECT pk FROM events WHERE {events[0]})"
    )
    return where, [*sinks, *statuses, *events[1]]


class _Requeue(WriteOp[tuple[int, int]]):
    """Make matching deliveries pending; return (events, deliveries) re-queued."""

    def __init__(self, sinks: Sequence[str], statuses: Sequence[str], events: EventsWhere) -> None:
        self.where, self.params = _requeueable(sinks, statuses, events)

    def apply(self, conn: sqlite3.Connection) -> tuple[int, int]:
        now = time.time()
        distinct = f"SELECT DISTINCT event_pk FROM deliveries WHERE {self.where}"
        pks = [row[0] for row in select(conn, distinct, self.params)]
        cursor = conn.execute(
            "UPDATE deliveries SET status = 'pending', next_attempt_at = ?, error = NULL,"
            f" error_code = NULL, updated_at = ? WHERE {self.where}",
            [now, now, *self.params],
        )
        conn.executemany(UPDATE_EVENT_STATUS, [(pk, pk) for pk in pks])
        return len(pks), cursor.rowcount


class _Defer(WriteOp[None]):
    def __init__(self, sink: str, account_ids: Sequence[str], until: float) -> None:
        self.args = (sink, account_ids, until)

    def apply(self, conn: sqlite3.Connection) -> None:
        sink, account_ids, until = self.args
        marks = ",".join("?" * len(account_ids))
        conn.execute(
            "UPDATE deliveries SET next_attempt_at = MAX(next_attempt_at, ?)"
            " WHERE sink = ? AND status = 'pending' AND event_pk IN"
            f" (SELECT pk FROM events WHERE account_id IN ({marks}))",
            [until, sink, *account_ids],
        )


class Outbox:
    """Queries and writes of pending deliveries, over the store's connections."""

    def __init__(self, reader: aiosqlite.Connection, writer: GroupCommitWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def due(
        self, sink: str, *, now: float, limit: int, exclude: frozenset[int]
    ) -> list[QueuedEvent]:
        """Return up to ``limit`` deliveries of ``sink`` due by ``now``, oldest first."""
        rows = await fetch_rows(
            self._reader,
            f"SELECT {QUEUED_COLUMNS} FROM deliveries d JOIN events e ON e.pk = d.event_pk"
            " WHERE d.sink = ? AND d.status = 'pending' AND d.next_attempt_at <= ?"
            " ORDER BY d.next_attempt_at, d.event_pk LIMIT ?",
            (sink, now, limit + len(exclude)),
        )
        items = [queued_from_row(row) for row in rows if row[0] not in exclude]
        return items[:limit]

    async def next_due(self, sink: str) -> float | None:
        """Return when the earliest pending delivery of ``sink`` is due."""
        rows = await fetch_rows(
            self._reader,
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE sink = ? AND status = 'pending'",
            (sink,),
        )
        return rows[0][0] if rows else None

    async def pending(self, sink: str) -> int:
        """Return how many deliveries of ``sink`` are pending."""
        rows = await fetch_rows(
            self._reader,
            "SELECT COUNT(*) FROM deliveries WHERE sink = ? AND status = 'pending'",
            (sink,),
        )
        return int(rows[0][0])

    async def stats(
        self,
    ) -> tuple[dict[str, tuple[int, float | None]], list[tuple[str, str, str, int]]]:
        """Return pending (count, oldest received_at) per sink, and counts per status."""
        pending = await fetch_rows(
            self._reader,
            "SELECT d.sink, COUNT(*), MIN(e.received_at) FROM deliveries d"
            " JOIN events e ON e.pk = d.event_pk WHERE d.status = 'pending' GROUP BY d.sink",
            (),
        )
        by_status = await fetch_rows(
            self._reader,
            "SELECT account_id, sink, status, deliveries FROM delivery_counts"
            " WHERE deliveries != 0",
            (),
        )
        return {row[0]: (row[1], row[2]) for row in pending}, [tuple(r) for r in by_status]

    async def record(self, sink: str, results: Sequence[AttemptResult]) -> None:
        """Store the outcomes of one attempt (one transaction)."""
        if results:
            await self._writer.submit(_Record(sink, results))

    async def requeue(
        self, account_id: str, *, sinks: Sequence[str], statuses: Sequence[str], since: float
    ) -> int:
        """Make matching deliveries pending again; return how many. Delivered ones never."""
        events = ("account_id = ? AND received_at >= ?", [account_id, since])
        return (await self.replay(sinks=sinks, statuses=statuses, events=events))[1]

    async def replay(
        self, *, sinks: Sequence[str], statuses: Sequence[str], events: EventsWhere
    ) -> tuple[int, int]:
        """Make the deliveries of the ``events`` that match pending again; return how many
        events and deliveries. Delivered ones never."""
        wanted = [s for s in statuses if s != "delivered"]
        if not wanted or not sinks:
            return 0, 0
        return await self._writer.submit(_Requeue(sinks, wanted, events))

    async def replayable(
        self, *, sinks: Sequence[str], statuses: Sequence[str], events: EventsWhere
    ) -> int:
        """Return how many events :meth:`replay` would re-queue now."""
        wanted = [s for s in statuses if s != "delivered"]
        if not wanted or not sinks:
            return 0
        where, params = _requeueable(sinks, wanted, events)
        rows = await fetch_rows(
            self._reader, f"SELECT COUNT(DISTINCT event_pk) FROM deliveries WHERE {where}", params
        )
        return int(rows[0][0])

    async def attempts(self, pk: int) -> list[Attempt]:
        """Return every attempt made for an event, oldest first."""
        rows = await fetch_rows(
            self._reader,
            "SELECT sink, attempt, at, outcome, http_status, error_code, message, trace_id,"
            " batch_size, duration_ms FROM delivery_attempts WHERE event_pk = ?"
            " ORDER BY at, sink, attempt",
            (pk,),
        )
        fields = Attempt.__struct_fields__
        return [Attempt(**dict(zip(fields, row, strict=True))) for row in rows]

    async def defer(self, sink: str, account_ids: Sequence[str], until: float) -> None:
        """Hold every pending delivery of these accounts until ``until`` (throttling)."""
        await self._writer.submit(_Defer(sink, account_ids, until))
