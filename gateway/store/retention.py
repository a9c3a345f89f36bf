"""Retention: what is past its keeping time goes, a small batch per transaction.

Each operation deletes (or clears) at most ``limit`` rows and says how many it touched; the
caller repeats it until a batch comes back short. Between batches the writer commits other
work, so a prune of a million rows never holds a conversion's commit for more than one small
batch. Events leave their daily counts behind (``event_daily``), so totals survive pruning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from gateway.store.lookups import EVERYTHING, Touched
from gateway.store.rows import scrubbed_fields
from gateway.store.schema import UPDATE_EVENT_STATUS
from gateway.store.sql import Tx
from gateway.store.writer import GroupCommitWriter, WriteOp

__all__ = ["RetentionCutoffs", "delete_conversations", "in_batches", "prune_all", "scrub_events"]

# The click fields a cleared click loses.
_CLICK_FIELDS = (
    "ctwa_clid",
    "ctwa_captured_at",
    "ctwa_clicked_at",
    "ctwa_source_id",
    "ctwa_source_url",
    "ctwa_headline",
    "ctwa_source_type",
    "ctwa_capture_source",
)


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


async def _column(tx: Tx, sql: str, params: Sequence[Any]) -> list[Any]:
    return [row[0] for row in await tx.fetch(sql, params)]


class PruneEvents(WriteOp[int]):
    """Delete events of these statuses received before ``before``, with their deliveries and
    attempts, adding them to the daily counts first."""

    def __init__(self, before: float, statuses: Sequence[str], limit: int) -> None:
        self.before, self.statuses, self.limit = before, tuple(statuses), limit

    async def apply(self, tx: Tx) -> int:
        pks = await _column(
            tx,
            f"SELECT pk FROM events WHERE received_at < ? AND status IN ({_marks(self.statuses)})"
            # An event shows "failed" while another of its sinks is still pending: that
            # delivery is not done, so the event stays.
            " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_pk = events.pk"
            " AND d.status = 'pending') ORDER BY received_at LIMIT ?",
            [self.before, *self.statuses, self.limit],
        )
        if not pks:
            return 0
        marks = _marks(pks)
        day = (
            "date(received_at, 'unixepoch')"
            if tx.engine == "sqlite"
            else "to_char(to_timestamp(received_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
        )
        await tx.execute(
            "INSERT INTO event_daily (day, account_id, event_name, status, events)"
            f" SELECT {day}, account_id, event_name, status, COUNT(*)"
            f" FROM events WHERE pk IN ({marks}) GROUP BY 1, 2, 3, 4"
            " ON CONFLICT (day, account_id, event_name, status)"
            " DO UPDATE SET events = event_daily.events + excluded.events",
            pks,
        )
        await tx.execute(f"DELETE FROM delivery_attempts WHERE event_pk IN ({marks})", pks)
        await tx.execute(f"DELETE FROM deliveries WHERE event_pk IN ({marks})", pks)
        await tx.execute(f"DELETE FROM events WHERE pk IN ({marks})", pks)
        return len(pks)


class ClearOldClicks(WriteOp[int]):
    """Clear the click of conversations clicked before ``before`` (it can no longer be
    attributed), and delete automatic click events received before then."""

    def __init__(self, before: float, limit: int) -> None:
        self.before, self.limit = before, limit

    def touched(self) -> Touched | None:
        return EVERYTHING  # many conversations at once

    async def apply(self, tx: Tx) -> int:
        ids = await _column(
            tx,
            "SELECT id FROM conversations WHERE ctwa_clid IS NOT NULL"
            " AND COALESCE(ctwa_clicked_at, ctwa_captured_at) < ? LIMIT ?",
            [self.before, self.limit],
        )
        if ids:
            cleared = ", ".join(f"{field} = NULL" for field in _CLICK_FIELDS)
            await tx.execute(f"UPDATE conversations SET {cleared} WHERE id IN ({_marks(ids)})", ids)
        automatic = await _column(
            tx,
            "SELECT pk FROM automatic_events WHERE received_at < ? LIMIT ?",
            [self.before, self.limit],
        )
        if automatic:
            await tx.execute(
                f"DELETE FROM automatic_events WHERE pk IN ({_marks(automatic)})", automatic
            )
        return max(len(ids), len(automatic))


class PruneConversations(WriteOp[int]):
    """Delete conversations without a click, quiet since ``before``, and what points at them
    (aliases, webhook message ids, automatic events)."""

    def __init__(self, before: float, limit: int) -> None:
        self.before, self.limit = before, limit

    def touched(self) -> Touched | None:
        return EVERYTHING  # many conversations at once

    async def apply(self, tx: Tx) -> int:
        # On PostgreSQL another replica may be capturing a click for one of them right now:
        # the rows are locked as chosen, one being captured is skipped (the next pass sees
        # it), and one whose capture committed meanwhile is read again and, now with its
        # click, not chosen; otherwise its click would be deleted with it. A capture that read
        # a row this deletes finds it gone and runs again (gateway.store.capture).
        locking = "" if tx.engine == "sqlite" else " FOR UPDATE SKIP LOCKED"
        ids = await _column(
            tx,
            "SELECT id FROM conversations WHERE ctwa_clid IS NULL"
            f" AND COALESCE(last_inbound_at, created_at) < ? LIMIT ?{locking}",
            [self.before, self.limit],
        )
        if ids:
            # Their finished events lose the person's hashed identifiers too: once the
            # conversation is gone nothing could find them for an erasure any more.
            await scrub_events(tx, ids, cancel_pending=False)
            await delete_conversations(tx, ids)
        return len(ids)


async def delete_conversations(tx: Tx, ids: Sequence[str]) -> dict[str, int]:
    """Delete these conversations and every row that points at them; return the counts."""
    marks = _marks(ids)
    counts = {}
    for table, column in (
        ("conversation_aliases", "conversation_id"),
        ("webhook_messages", "conversation_id"),
        ("automatic_events", "conversation_id"),
        ("conversations", "id"),
    ):
        counts[table] = await tx.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", ids)
    return counts


# user_data keys that identify the person (hashed or not); what stays is the WABA id.
_PERSONAL_USER_DATA = ("em", "ph", "external_id", "ctwa_clid", "fn", "ln", "db", "ge", "ct")
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


async def scrub_events(
    tx: Tx,
    conversation_ids: Sequence[str],
    *,
    account_id: str | None = None,
    cancel_pending: bool = True,
) -> tuple[int, int]:
    """Remove the person's identifiers from the events of these conversations (the stored
    Meta event's user_data, dry-run payload copies, request digests); cancel their pending
    deliveries, or, with ``cancel_pending`` false, leave events still pending untouched (they
    need their payload to be sent). Return (events scrubbed, deliveries cancelled)."""
    marks = _marks(conversation_ids)
    sql = f"SELECT pk, event, request_fields FROM events WHERE conversation_id IN ({marks})"
    params: list[Any] = list(conversation_ids)
    if account_id is not None:
        sql += " AND account_id = ?"
        params.append(account_id)
    if not cancel_pending:
        sql += (
            " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_pk = events.pk"
            " AND d.status = 'pending')"
        )
    scrubbed = []
    for pk, raw, fields in await tx.fetch(sql, params):
        event = _decode(raw)
        user_data = event.get("user_data") if isinstance(event, dict) else None
        if isinstance(user_data, dict):
            for key in _PERSONAL_USER_DATA:
                user_data.pop(key, None)
        scrubbed.append((_encode(event), scrubbed_fields(fields), pk))
    if not scrubbed:
        return 0, 0
    pks = [pk for *_, pk in scrubbed]
    await tx.executemany("UPDATE events SET event = ?, request_fields = ? WHERE pk = ?", scrubbed)
    pk_marks = _marks(pks)
    cancelled = 0
    if cancel_pending:
        cancelled = await tx.execute(
            "UPDATE deliveries SET status = 'failed', error_code = 'erased',"
            " error = 'cancelled: the person was erased on request; never sent',"
            f" next_attempt_at = NULL WHERE status = 'pending' AND event_pk IN ({pk_marks})",
            pks,
        )
    await tx.execute(f"UPDATE deliveries SET payload = NULL WHERE event_pk IN ({pk_marks})", pks)
    await tx.executemany(UPDATE_EVENT_STATUS, [(pk, pk) for pk in pks])
    return len(pks), cancelled


class RetentionCutoffs:
    """The times before which each kind of data goes, for one run of housekeeping."""

    def __init__(
        self,
        *,
        conversations: float,
        clicks: float,
        delivered_events: float,
        failed_events: float,
    ) -> None:
        self.conversations = conversations
        self.clicks = clicks
        self.delivered_events = delivered_events
        self.failed_events = failed_events


async def prune_all(
    writer: GroupCommitWriter, cutoffs: RetentionCutoffs, limit: int
) -> dict[str, int]:
    """Apply every rule, batch after batch, until each is done; return what each removed."""
    delivered, failed = ("delivered", "dry_run"), ("failed", "expired")
    plan: list[tuple[str, Callable[[], WriteOp[int]]]] = [
        ("delivered_events", lambda: PruneEvents(cutoffs.delivered_events, delivered, limit)),
        ("failed_events", lambda: PruneEvents(cutoffs.failed_events, failed, limit)),
        ("clicks", lambda: ClearOldClicks(cutoffs.clicks, limit)),
        ("conversations", lambda: PruneConversations(cutoffs.conversations, limit)),
    ]
    return {name: await in_batches(writer, make, limit) for name, make in plan}


async def in_batches(
    writer: GroupCommitWriter, make: Callable[[], WriteOp[int]], limit: int
) -> int:
    """Commit ``make()`` ops, each removing up to ``limit`` rows, until one removes fewer;
    return how many they removed: a prune of a million rows never holds the writer (and every
    conversion's commit) for seconds."""
    total = 0
    while True:
        count = await writer.submit(make())
        total += count
        if count < limit:
            return total
