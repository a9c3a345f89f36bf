"""The archive of signed webhook notifications: raw bytes first, so no click id is ever lost.

Every notification that passes the signature check is stored as received, in the same
transaction as what it captured (:class:`~gateway.store.capture.CaptureOp` calls :func:`record_new`)
or on its own when processing failed (:class:`ArchivePending`). Its status says what is left:

- ``processed``: every part captured;
- ``partial``: some parts were not (each a row of ``webhook_problems``: path, code, reason);
  ``ctwa-gateway webhooks reprocess`` re-runs just those parts, e.g. after an upgrade;
- ``pending``: processing failed as a whole (a fault, not the payload); the next start and
  ``reprocess`` run it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from gateway.capture.records import Problem
from gateway.store.sql import Reader, Tx, marks
from gateway.store.writer import WriteOp

__all__ = [
    "ArchivePending",
    "ArchivedNotification",
    "MarkFailed",
    "NewNotification",
    "NotificationStatus",
    "PruneArchive",
    "Reprocess",
    "body_of",
    "claim",
    "open_notifications",
    "record_new",
    "record_reprocessed",
    "status_counts",
]

NotificationStatus = Literal["processed", "partial", "pending"]


class NewNotification(msgspec.Struct, frozen=True, kw_only=True):
    """A notification just received, to archive with what it captured."""

    body: bytes
    received_at: float
    request_id: str | None


class Reprocess(msgspec.Struct, frozen=True, kw_only=True):
    """An archived notification being processed again."""

    pk: int
    # The row's attempts when it was read: another process that got there first wins.
    attempts: int
    # The problem paths re-examined (and so replaced); None: the whole notification.
    examined: tuple[str, ...] | None


class ArchivedNotification(msgspec.Struct, frozen=True, kw_only=True):
    """An archived notification that is not fully processed, with its problems."""

    pk: int
    received_at: float
    request_id: str | None
    status: NotificationStatus
    attempts: int
    error: str | None
    problems: list[Problem]


def _storable(value: str | None) -> str | None:
    """A problem's text as both engines keep it: it may quote what Meta sent, NULs included,
    which PostgreSQL's text cannot hold."""
    return None if value is None else value.replace("\x00", "\ufffd")


def _status(problems: int) -> NotificationStatus:
    return "partial" if problems else "processed"


async def _insert_problems(tx: Tx, pk: int, problems: Sequence[Problem]) -> None:
    await tx.executemany(
        "INSERT INTO webhook_problems (notification_pk, path, code, reason,"
        " account_id, phone_number_id) VALUES (?,?,?,?,?,?)"
        " ON CONFLICT (notification_pk, path, code) DO UPDATE SET reason = excluded.reason,"
        " account_id = excluded.account_id, phone_number_id = excluded.phone_number_id",
        [
            (
                pk,
                *(
                    _storable(v)
                    for v in (p.path, p.code, p.reason, p.account_id, p.phone_number_id)
                ),
            )
            for p in problems
        ],
    )


async def record_new(tx: Tx, new: NewNotification, problems: Sequence[Problem], now: float) -> int:
    """Archive ``new`` with its problems (inside the capture's transaction); return its pk."""
    rows = await tx.fetch(
        "INSERT INTO webhook_notifications (received_at, request_id, body, status, problems,"
        " processed_at) VALUES (?,?,?,?,?,?) RETURNING pk",
        (new.received_at, new.request_id, new.body, _status(len(problems)), len(problems), now),
    )
    pk: int = rows[0][0]
    if problems:
        await _insert_problems(tx, pk, problems)
    return pk


async def claim(tx: Tx, reprocess: Reprocess) -> bool:
    """Tell whether the row is as it was read (else someone reprocessed it meanwhile)."""
    rows = await tx.fetch(
        "SELECT attempts FROM webhook_notifications WHERE pk = ?", (reprocess.pk,)
    )
    return bool(rows) and rows[0][0] == reprocess.attempts


async def record_reprocessed(
    tx: Tx, reprocess: Reprocess, problems: Sequence[Problem], now: float
) -> NotificationStatus:
    """Replace the re-examined problems by the ones found now; return the new status."""
    if reprocess.examined is None:
        await tx.execute("DELETE FROM webhook_problems WHERE notification_pk = ?", (reprocess.pk,))
    else:
        await tx.executemany(
            "DELETE FROM webhook_problems WHERE notification_pk = ? AND path = ?",
            [(reprocess.pk, path) for path in reprocess.examined],
        )
    await _insert_problems(tx, reprocess.pk, problems)
    rows = await tx.fetch(
        "SELECT COUNT(*) FROM webhook_problems WHERE notification_pk = ?",
        (reprocess.pk,),
    )
    left = int(rows[0][0])
    status = _status(left)
    await tx.execute(
        "UPDATE webhook_notifications SET status = ?, problems = ?, attempts = attempts + 1,"
        " error = NULL, processed_at = ? WHERE pk = ?",
        (status, left, now, reprocess.pk),
    )
    return status


class ArchivePending(WriteOp[int]):
    """Archive a notification whose processing failed as a whole, to be processed later."""

    def __init__(self, new: NewNotification, error: str) -> None:
        self.new = new
        self.error = error

    async def apply(self, tx: Tx) -> int:
        rows = await tx.fetch(
            "INSERT INTO webhook_notifications (received_at, request_id, body, status, error)"
            " VALUES (?,?,?,'pending',?) RETURNING pk",
            (self.new.received_at, self.new.request_id, self.new.body, self.error),
        )
        pk: int = rows[0][0]
        return pk


class MarkFailed(WriteOp[None]):
    """Count a failed reprocessing attempt of a pending notification, with its error."""

    def __init__(self, pk: int, error: str) -> None:
        self.pk = pk
        self.error = error

    async def apply(self, tx: Tx) -> None:
        await tx.execute(
            "UPDATE webhook_notifications SET attempts = attempts + 1, error = ? WHERE pk = ?",
            (self.error, self.pk),
        )


class PruneArchive(WriteOp[int]):
    """Forget up to ``limit`` of the archived notifications received before a time, with
    their problems."""

    def __init__(self, before: float, limit: int) -> None:
        self.before, self.limit = before, limit

    async def apply(self, tx: Tx) -> int:
        rows = await tx.fetch(
            "SELECT pk FROM webhook_notifications WHERE received_at < ? ORDER BY pk LIMIT ?",
            (self.before, self.limit),
        )
        pks = [row[0] for row in rows]
        if not pks:
            return 0
        listed = marks(len(pks))
        await tx.execute(f"DELETE FROM webhook_problems WHERE notification_pk IN ({listed})", pks)
        return await tx.execute(f"DELETE FROM webhook_notifications WHERE pk IN ({listed})", pks)


async def open_notifications(
    reader: Reader,
    *,
    since: float = 0.0,
    accounts: Sequence[tuple[str, str]] | None = None,
    statuses: Sequence[NotificationStatus] = ("partial", "pending"),
    limit: int = 100,
    after_pk: int = 0,
    before: float | None = None,
) -> list[ArchivedNotification]:
    """Return notifications not fully processed, oldest first, with their problems.

    ``accounts``: (account id, phone number id) pairs; only partial notifications with a
    problem of one of them (pending ones, whose parts are unknown yet, are left out).
    """
    marks = ",".join("?" * len(statuses))
    where = f"status IN ({marks}) AND received_at >= ? AND pk > ?"
    params: list[Any] = [*statuses, since, after_pk]
    if before is not None:
        where += " AND received_at < ?"
        params.append(before)
    if accounts is not None:
        match = " OR ".join("p.account_id = ? OR p.phone_number_id = ?" for _ in accounts)
        where += (
            " AND status = 'partial' AND EXISTS (SELECT 1 FROM webhook_problems p"
            f" WHERE p.notification_pk = pk AND ({match}))"
        )
        params.extend(v for pair in accounts for v in pair)
    rows = await reader.fetch(
        "SELECT pk, received_at, request_id, status, attempts, error FROM webhook_notifications"
        f" WHERE {where} ORDER BY pk LIMIT ?",
        [*params, limit],
    )
    if not rows:
        return []
    pks = [row[0] for row in rows]
    problems: dict[int, list[Problem]] = {pk: [] for pk in pks}
    found = await reader.fetch(
        "SELECT notification_pk, path, code, reason, account_id, phone_number_id"
        f" FROM webhook_problems WHERE notification_pk IN ({','.join('?' * len(pks))})"
        " ORDER BY notification_pk, path",
        pks,
    )
    for pk, path, code, reason, account_id, number in found:
        problems[pk].append(
            Problem(
                path=path, code=code, reason=reason, account_id=account_id, phone_number_id=number
            )
        )
    return [
        ArchivedNotification(
            pk=pk,
            received_at=received_at,
            request_id=request_id,
            status=status,
            attempts=attempts,
            error=error,
            problems=problems[pk],
        )
        for pk, received_at, request_id, status, attempts, error in rows
    ]


async def body_of(reader: Reader, pk: int) -> bytes | None:
    """Return an archived notification's bytes."""
    rows = await reader.fetch("SELECT body FROM webhook_notifications WHERE pk = ?", (pk,))
    return bytes(rows[0][0]) if rows else None


async def status_counts(reader: Reader) -> dict[str, int]:
    """Return how many archived notifications are partial and pending."""
    rows = await reader.fetch(
        "SELECT status, COUNT(*) FROM webhook_notifications WHERE status != 'processed'"
        " GROUP BY status",
        (),
    )
    return {"partial": 0, "pending": 0, **{status: int(count) for status, count in rows}}
