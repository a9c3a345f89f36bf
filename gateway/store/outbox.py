"""The outbox: pending deliveries as the store holds them, for sinks that deliver later.

An accepted event's delivery row is committed with status ``pending`` (and due at once) in the
same transaction as the event. A dispatcher takes work with :meth:`Outbox.claim`, sends it, and
records each outcome with :meth:`Outbox.record` (one transaction per batch, with one attempt
row per event). Nothing here knows about any one sink.

**Claims.** Any number of processes may deliver from one store (several ``serve``, a
``ctwa-gateway send`` beside them). What keeps them from sending one event twice is in the row,
not in anyone's memory: a claim writes the claimant's name and a lease expiry into each
delivery it takes, in one statement that only takes rows nobody holds (the write transaction
makes it atomic across processes). The claimant renews the lease while its request is in flight
and clears it when it records the outcome, which it may do only while the claim is still its
own. A claimant that dies leaves its lease to expire, and the rows are taken again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog

from gateway.domain import Attempt, QueuedEvent, SinkState
from gateway.store.rows import QUEUED_COLUMNS, queued_from_row, sink_state_from_row
from gateway.store.schema import UPDATE_EVENT_STATUS
from gateway.store.sql import Reader, Tx, marks, wake_dispatchers
from gateway.store.writer import GroupCommitWriter, WriteOp

__all__ = ["AttemptResult", "EventsWhere", "Outbox", "count_deliveries"]

log = structlog.get_logger()

_COUNT_DELIVERIES = (
    "INSERT INTO delivery_counts (account_id, sink, status, deliveries) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (account_id, sink, status) DO UPDATE"
    " SET deliveries = delivery_counts.deliveries + excluded.deliveries"
)


async def count_deliveries(tx: Tx, added: Sequence[tuple[str, str, str]]) -> None:
    """Add new deliveries rows, as (account, sink, status), to ``delivery_counts`` in the
    transaction that writes them (triggers follow their status changes and deletions); in key
    order, so replicas adding to the same rows at once take their locks in one order."""
    tallies: dict[tuple[str, str, str], int] = {}
    for key in added:
        tallies[key] = tallies.get(key, 0) + 1
    if tallies:
        await tx.executemany(_COUNT_DELIVERIES, [(*key, n) for key, n in sorted(tallies.items())])


_encode = msgspec.json.Encoder().encode


class AttemptResult(msgspec.Struct, frozen=True, kw_only=True):
    """The new state of one delivery after one attempt, and that attempt's record."""

    pk: int
    state: SinkState
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    # When to try again (status pending); None for a final state.
    next_attempt_at: float | None = None


# Take up to N due deliveries of a sink that nobody holds (no claim, or an expired one).
_CLAIM = (
    "UPDATE deliveries SET claimed_by = ?, claim_until = ? WHERE sink = ? AND event_pk IN"
    " (SELECT event_pk FROM deliveries WHERE sink = ? AND status = 'pending'"
    " AND next_attempt_at <= ? AND (claim_until IS NULL OR claim_until <= ?)"
    " ORDER BY next_attempt_at, event_pk LIMIT ?) RETURNING event_pk"
)
# Keys per IN list: well under the bound on a statement's parameters (32,766 on SQLite,
# 32,767 on PostgreSQL).
_KEYS_PER_STATEMENT = 10_000
# On PostgreSQL, rows another claimer has locked are skipped rather than waited for: without
# SKIP LOCKED, a claimer that waited would take rows the first one just took (PostgreSQL does
# not run the subquery again when it re-checks a row).
_CLAIM_SKIP_LOCKED = _CLAIM.replace(" LIMIT ?)", " LIMIT ? FOR UPDATE SKIP LOCKED)")
_INSERT_ATTEMPT = (
    "INSERT INTO delivery_attempts (event_pk, sink, attempt, at, outcome, http_status,"
    " error_code, message, trace_id, batch_size, duration_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (event_pk, sink, attempt)"
)
_REPLACE_ATTEMPT = ", ".join(
    f" {column} = excluded.{column}"
    for column in (
        "at", "outcome", "http_status", "error_code", "message", "trace_id", "batch_size",
        "duration_ms",
    )
)  # fmt: skip


async def database_clock(tx: Tx) -> float:
    """The database server's time, in Unix seconds (PostgreSQL)."""
    rows = await tx.fetch(_DATABASE_CLOCK, ())
    return float(rows[0][0])


_DATABASE_CLOCK = "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8"


class _Claim(WriteOp[list[QueuedEvent]]):
    """Claim up to ``limit`` due deliveries of ``sink`` for ``owner`` until ``until``."""

    inline = True

    def __init__(self, sink: str, owner: str, now: float, until: float, limit: int) -> None:
        self.args = (sink, owner, now, until, limit)

    async def apply(self, tx: Tx) -> list[QueuedEvent]:
        sink, owner, now, until, limit = self.args
        claims_now = now
        if tx.engine != "sqlite":
            # Replicas on several machines: a claim's end is set and read by one clock, the
            # database's, or a replica whose clock runs ahead takes claims still held. (When
            # a delivery is due stays in the writers' clocks, as it was written.)
            skew = await database_clock(tx) - now
            claims_now, until = now + skew, until + skew
        claim = _CLAIM if tx.engine == "sqlite" else _CLAIM_SKIP_LOCKED
        pks = [
            row[0]
            for row in await tx.fetch(claim, (owner, until, sink, sink, now, claims_now, limit))
        ]
        if not pks:
            return []
        # The rows just claimed carry this very stamp (a list of their keys could pass the
        # engines' bound on parameters).
        rows = await tx.fetch(
            f"SELECT {QUEUED_COLUMNS} FROM deliveries d JOIN events e ON e.pk = d.event_pk"
            " WHERE d.claimed_by = ? AND d.claim_until = ? AND d.sink = ?"
            " ORDER BY d.next_attempt_at, d.event_pk",
            (owner, until, sink),
        )
        return [queued_from_row(row) for row in rows]


class _Renew(WriteOp[None]):
    """Extend ``owner``'s claims on these deliveries of ``sink`` to ``until``."""

    inline = True

    def __init__(self, sink: str, owner: str, pks: Sequence[int], until: float, now: float) -> None:
        self.args = (sink, owner, pks, until)
        self.now = now

    async def apply(self, tx: Tx) -> None:
        sink, owner, pks, until = self.args
        if tx.engine != "sqlite":
            until += await database_clock(tx) - self.now  # the database's clock (see _Claim)
        for start in range(0, len(pks), _KEYS_PER_STATEMENT):
            part = pks[start : start + _KEYS_PER_STATEMENT]
            await tx.execute(
                "UPDATE deliveries SET claim_until = ? WHERE claimed_by = ? AND sink = ?"
                f" AND event_pk IN ({marks(len(part))})",
                [until, owner, sink, *part],
            )


class _Release(WriteOp[int]):
    """Give back every claim ``owner`` holds on ``sink`` (at shutdown)."""

    def __init__(self, sink: str, owner: str) -> None:
        self.args = (sink, owner)

    async def apply(self, tx: Tx) -> int:
        return await tx.execute(
            "UPDATE deliveries SET claimed_by = NULL, claim_until = NULL"
            " WHERE claimed_by = ? AND sink = ?",
            (self.args[1], self.args[0]),
        )


class _Record(WriteOp[int]):
    """Store outcomes and clear their claims, for the rows ``owner`` still holds; return how
    many it no longer did (their leases ran out and another process took them)."""

    inline = True

    def __init__(self, sink: str, owner: str, results: Sequence[AttemptResult]) -> None:
        self.sink = sink
        self.owner = owner
        self.results = results

    def _attempt_rows(self, results: Sequence[AttemptResult]) -> list[tuple[Any, ...]]:
        return [
            (r.pk, self.sink, a.attempt, a.at, a.outcome, a.http_status, a.error_code,
             a.message, a.trace_id, a.batch_size, a.duration_ms)
            for r in results
            for a in r.attempts
        ]  # fmt: skip

    async def apply(self, tx: Tx) -> int:
        now = time.time()
        results = self.results
        lost = {
            row[0]
            for row in await tx.fetch(
                "SELECT event_pk FROM deliveries WHERE sink = ? AND claimed_by IS DISTINCT FROM ?"
                f" AND event_pk IN ({marks(len(results))})",
                [self.sink, self.owner, *(r.pk for r in results)],
            )
        }
        if lost:
            # What the other process finds is its to record: ours would overwrite it.
            results = [r for r in results if r.pk not in lost]
        await tx.executemany(
            "UPDATE deliveries SET status = ?, attempts = ?, error = ?, error_code = ?,"
            " trace_id = ?, events_received = ?, warnings = ?, next_attempt_at = ?,"
            " updated_at = ?, claimed_by = NULL, claim_until = NULL"
            " WHERE event_pk = ? AND sink = ? AND error_code IS DISTINCT FROM 'erased'",
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
                for r in results
            ],
        )
        await tx.executemany(
            _INSERT_ATTEMPT + " DO UPDATE SET" + _REPLACE_ATTEMPT, self._attempt_rows(results)
        )
        if lost:
            # The attempts happened and stay in the history, but never over the rows of the
            # process that holds the claim now.
            await tx.executemany(
                _INSERT_ATTEMPT + " DO NOTHING",
                self._attempt_rows([r for r in self.results if r.pk in lost]),
            )
        await tx.executemany(UPDATE_EVENT_STATUS, [(r.pk, r.pk) for r in results])
        return len(lost)


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
        " AND error_code IS DISTINCT FROM 'erased'"
        f" AND event_pk IN (SELECT pk FROM events WHERE {events[0]})"
    )
    return where, [*sinks, *statuses, *events[1]]


class _Requeue(WriteOp[tuple[int, int]]):
    """Make matching deliveries pending; return (events, deliveries) re-queued."""

    def __init__(self, sinks: Sequence[str], statuses: Sequence[str], events: EventsWhere) -> None:
        self.where, self.params = _requeueable(sinks, statuses, events)

    async def apply(self, tx: Tx) -> tuple[int, int]:
        now = time.time()
        distinct = f"SELECT DISTINCT event_pk FROM deliveries WHERE {self.where}"
        pks = [row[0] for row in await tx.fetch(distinct, self.params)]
        requeued = await tx.execute(
            "UPDATE deliveries SET status = 'pending', next_attempt_at = ?, error = NULL,"
            f" error_code = NULL, updated_at = ? WHERE {self.where}",
            [now, now, *self.params],
        )
        await tx.executemany(UPDATE_EVENT_STATUS, [(pk, pk) for pk in pks])
        if requeued:
            await wake_dispatchers(tx)
        return len(pks), requeued


class _Defer(WriteOp[None]):
    def __init__(self, sink: str, account_ids: Sequence[str], until: float) -> None:
        self.args = (sink, account_ids, until)

    async def apply(self, tx: Tx) -> None:
        sink, account_ids, until = self.args
        later = "MAX" if tx.engine == "sqlite" else "GREATEST"
        await tx.execute(
            f"UPDATE deliveries SET next_attempt_at = {later}(next_attempt_at, ?)"
            " WHERE sink = ? AND status = 'pending' AND event_pk IN"
            f" (SELECT pk FROM events WHERE account_id IN ({marks(len(account_ids))}))",
            [until, sink, *account_ids],
        )


class Outbox:
    """Queries and writes of pending deliveries, over the store's connections."""

    def __init__(self, reader: Reader, writer: GroupCommitWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def claim(
        self, sink: str, *, owner: str, now: float, lease_s: float, limit: int
    ) -> list[QueuedEvent]:
        """Claim up to ``limit`` deliveries of ``sink`` due by ``now`` that nobody holds, for
        ``owner`` until ``now + lease_s``; return them oldest first."""
        return await self._writer.submit(_Claim(sink, owner, now, now + lease_s, limit))

    async def renew(
        self, sink: str, *, owner: str, pks: Sequence[int], now: float, lease_s: float
    ) -> None:
        """Extend ``owner``'s claims on these deliveries to ``now + lease_s``."""
        if pks:
            await self._writer.submit(_Renew(sink, owner, pks, now + lease_s, now))

    async def release(self, sink: str, *, owner: str) -> int:
        """Give back every claim ``owner`` holds on ``sink``; return how many."""
        return await self._writer.submit(_Release(sink, owner))

    async def next_due(self, sink: str, *, now: float, owner: str) -> float | None:
        """Return when there may next be work for ``owner``: the earliest due delivery of
        ``sink`` that nobody holds, or the earliest expiry of another's claim."""
        skew = 0.0
        if self._reader.engine != "sqlite":
            # Claims' ends are in the database's clock (see _Claim): compared with it, and
            # turned back into this process's.
            rows = await self._reader.fetch(_DATABASE_CLOCK, ())
            skew = float(rows[0][0]) - now
        rows = await self._reader.fetch(
            "SELECT MIN(t) FROM (SELECT * FROM (SELECT next_attempt_at AS t FROM deliveries"
            " WHERE sink = ? AND status = 'pending' AND (claim_until IS NULL OR claim_until <= ?)"
            " ORDER BY next_attempt_at LIMIT 1) UNION ALL SELECT claim_until - ? FROM deliveries"
            " WHERE claimed_by IS NOT NULL AND claimed_by != ? AND sink = ?"
            " AND status = 'pending' AND claim_until > ?)",
            (sink, now + skew, skew, owner, sink, now + skew),
        )
        return rows[0][0] if rows else None

    async def attempted(self, sink: str, pk: int) -> SinkState | None:
        """Event ``pk``'s state at ``sink`` once any process has attempted it (or ended it
        unattempted: expired), without its payload; None while it waits."""
        rows = await self._reader.fetch(
            "SELECT status, attempts, NULL, error, error_code, trace_id, events_received,"
            " warnings FROM deliveries WHERE event_pk = ? AND sink = ?"
            " AND (attempts > 0 OR status != 'pending')",
            (pk, sink),
        )
        return sink_state_from_row(rows[0]) if rows else None

    async def pending(self, sink: str) -> int:
        """Return how many deliveries of ``sink`` are pending."""
        rows = await self._reader.fetch(
            "SELECT COUNT(*) FROM deliveries WHERE sink = ? AND status = 'pending'",
            (sink,),
        )
        return int(rows[0][0])

    async def stats(
        self,
    ) -> tuple[dict[str, tuple[int, float | None]], list[tuple[str, str, str, int]]]:
        """Return pending (count, oldest received_at) per sink, and counts per status."""
        pending = await self._reader.fetch(
            "SELECT d.sink, COUNT(*), MIN(e.received_at) FROM deliveries d"
            " JOIN events e ON e.pk = d.event_pk WHERE d.status = 'pending' GROUP BY d.sink",
            (),
        )
        by_status = await self._reader.fetch(
            "SELECT account_id, sink, status, deliveries FROM delivery_counts"
            " WHERE deliveries != 0",
            (),
        )
        return {row[0]: (row[1], row[2]) for row in pending}, [tuple(r) for r in by_status]

    async def record(self, sink: str, results: Sequence[AttemptResult], *, owner: str) -> int:
        """Store the outcomes of one attempt (one transaction) and clear their claims, where
        ``owner`` still holds them; return how many it no longer held."""
        if not results:
            return 0
        return await self._writer.submit(_Record(sink, owner, results))

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
        rows = await self._reader.fetch(
            f"SELECT COUNT(DISTINCT event_pk) FROM deliveries WHERE {where}", params
        )
        return int(rows[0][0])

    async def attempts(self, pk: int) -> list[Attempt]:
        """Return every attempt made for an event, oldest first."""
        rows = await self._reader.fetch(
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
