"""The write that stores accepted conversions: each event's row, its sinks' deliveries rows
and the counts they add to, for a whole group commit's batch at once.

Every accepted conversion goes through here, so on SQLite this is the hot path of the store:
each event's row is built once, bound as SQLite takes it (:func:`gateway.store.rows.event_params`),
when the request makes its op; the batch then goes in with one statement for the events and
one for their deliveries, their texts made once per batch size, and the rows bound as they
are. PostgreSQL takes the same rows as one array per column.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

from gateway.domain import StoredEvent, overall_status
from gateway.store.outbox import count_deliveries
from gateway.store.reports import count_in_hours
from gateway.store.rows import (
    INSERT_DELIVERY,
    Money,
    delivery_row,
    event_params,
    insert_deliveries,
    insert_events,
    insert_events_unnest,
    value_and_currency,
)
from gateway.store.sql import SqliteTx, Tx, wake_dispatchers
from gateway.store.writer import WriteOp

__all__ = ["InsertEvent"]

# An event's key: its account and eventId.
Key = tuple[str, str]
# Rows per multi-row INSERT: one statement (one step, one release of the GIL) for a whole
# batch, well under SQLite's 32,766 bound parameters.
_ROWS_PER_STATEMENT = 500


class InsertEvent(WriteOp[tuple[int, bool]]):
    """Insert an event unless its ``(account, eventId)`` exists; say which happened (its pk,
    and whether it was a duplicate)."""

    inline = True

    def __init__(self, new: StoredEvent) -> None:
        # The event as it is stored: its status is its sinks' (the row, the hourly counts and
        # the answer alike).
        status = overall_status(new.deliveries)
        self.new = new if new.status == status else msgspec.structs.replace(new, status=status)
        self.key: Key = (new.account_id, new.event_id)
        self.money = value_and_currency(self.new.event)
        self.row = event_params(self.new, self.money)

    @classmethod
    async def apply_many(cls, tx: Tx, ops: Sequence[WriteOp[Any]]) -> list[Any]:
        mine = [op for op in ops if isinstance(op, InsertEvent)]
        # The first request per key is the one that may insert; a second in the same batch
        # is its duplicate.
        first: dict[Key, InsertEvent] = {}
        for op in mine:
            first.setdefault(op.key, op)
        candidates = list(first.values()) if len(first) < len(mine) else mine
        pks: dict[Key, tuple[int, bool]] = {}
        for start in range(0, len(candidates), _ROWS_PER_STATEMENT):
            chunk = candidates[start : start + _ROWS_PER_STATEMENT]
            pks.update(await _insert_chunk(tx, chunk))
        now = time.time()
        results: list[tuple[int, bool]] = []
        rows: list[tuple[Any, ...]] = []
        inserted: list[tuple[StoredEvent, Money]] = []
        counted: list[tuple[str, str, str]] = []
        for op in mine:
            pk, new_row = pks[op.key]
            mine_inserted = new_row and first[op.key] is op
            results.append((pk, not mine_inserted))
            if mine_inserted:
                new = op.new
                inserted.append((new, op.money))
                for sink, state in new.deliveries.items():
                    rows.append(delivery_row(pk, sink, state, now, new.event))
                    counted.append((new.account_id, sink, state.status))
        if isinstance(tx, SqliteTx):
            for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                part = rows[start : start + _ROWS_PER_STATEMENT]
                tx.conn.execute(insert_deliveries(len(part)), [v for row in part for v in row])
        else:
            # One statement text for any count (see insert_events_unnest), sent as a batch.
            await tx.executemany(INSERT_DELIVERY, rows)
        # delivery_counts before event_hours, the order every other write takes them in (a
        # status change updates deliveries, then events, and their triggers follow): on
        # PostgreSQL the opposite order here deadlocked with the dispatchers' records.
        await count_deliveries(tx, counted)
        await count_in_hours(tx, inserted)
        if any(status == "pending" for _, _, status in counted):
            await wake_dispatchers(tx)
        return results


async def _insert_chunk(tx: Tx, ops: Sequence[InsertEvent]) -> dict[Key, tuple[int, bool]]:
    """Insert events whose keys differ; return each key's pk and whether this inserted it."""
    if not isinstance(tx, SqliteTx):
        inserted = {
            (account_id, event_id): (pk, True)
            for pk, account_id, event_id in await tx.fetch(
                *insert_events_unnest([op.row for op in ops])
            )
        }
        return {**await _existing(tx, [op.key for op in ops if op.key not in inserted]), **inserted}
    cursor = tx.conn.execute(insert_events(len(ops)), [v for op in ops for v in op.row])
    last = cursor.lastrowid
    if cursor.rowcount == len(ops) and last is not None:
        # No conflict: SQLite gave the rows consecutive rowids (each new one is the largest
        # plus one), in the order of the VALUES.
        first_pk = last - len(ops) + 1
        return {op.key: (first_pk + i, True) for i, op in enumerate(ops)}
    # Some keys existed (a retry racing its original, or another process): the rows this
    # statement inserted are the only ones above the largest rowid before it.
    inserted_above = (last or 0) - cursor.rowcount if cursor.rowcount > 0 else None
    return {
        key: (pk, inserted_above is not None and pk > inserted_above)
        for key, (pk, _) in (await _existing(tx, [op.key for op in ops])).items()
    }


async def _existing(tx: Tx, keys: Sequence[Key]) -> dict[Key, tuple[int, bool]]:
    """The pks of these (account, eventId) keys' stored events, as not inserted now."""
    if not keys:
        return {}
    where = " OR ".join("(account_id = ? AND event_id = ?)" for _ in keys)
    found = await tx.fetch(
        f"SELECT account_id, event_id, pk FROM events WHERE {where}",
        [v for key in keys for v in key],
    )
    return {(account_id, event_id): (pk, False) for account_id, event_id, pk in found}
