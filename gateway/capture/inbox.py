"""Receiving signed notifications, and processing archived ones again.

:func:`receive` is what the webhook does after the signature check: extract, capture and
archive in one transaction; if that fails in any way, archive the bytes alone (``pending``);
only if even that fails does Meta hear 503 and retry. :func:`reprocess` re-runs archived
notifications that are not fully processed, part by part, idempotently (the wamid check and
one-shot capture make a second run change nothing that the first one captured).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence

import msgspec
import structlog

from gateway.capture.extract import extract
from gateway.capture.records import ROOT, CaptureBatch, Problem
from gateway.config import AccountConfig, Settings
from gateway.errors import ServiceUnavailable
from gateway.metrics import Metrics
from gateway.store.archive import NewNotification, NotificationStatus, Reprocess
from gateway.store.capture import CaptureResult, ProblemView
from gateway.store.database import Store

__all__ = ["ReprocessReport", "receive", "reprocess"]

log = structlog.get_logger()

_PENDING_REASON = (
    "Stored as received; processing failed and runs again at the next start or with"
    " `ctwa-gateway webhooks reprocess`."
)
# Problems named in one log line; the archive and `webhooks list` have them all.
_LOGGED = 10
# Meta's 1,000-message notifications are ~300 KB; bigger bodies are extracted in a thread.
_OFF_LOOP_BYTES = 1 << 20


def _log_problems(batch: CaptureBatch, notification_id: int | None, metrics: Metrics) -> None:
    if not batch.problems:
        return
    counts = Counter(p.code for p in batch.problems)
    for code, count in counts.items():
        metrics.webhook_unprocessed.labels(code).inc(count)
    unknown = sorted({p.phone_number_id for p in batch.problems if p.phone_number_id})
    if unknown:
        # Business phone number ids (or WABA ids), not personal data.
        log.warning("webhook_unknown_numbers", ids=unknown[:20])
    # Paths and codes only: reasons are safe, but paths say all an operator needs here.
    log.warning(
        "webhook_unprocessed",
        notification_id=notification_id,
        counts=dict(counts),
        first=[{"path": p.path, "code": p.code} for p in batch.problems[:_LOGGED]],
    )


async def receive(
    store: Store,
    settings: Settings,
    metrics: Metrics,
    body: bytes,
    *,
    request_id: str | None,
) -> CaptureResult:
    """Capture a verified notification; archive it whatever happens; 503 if it cannot be."""
    now = time.time()
    new = (
        NewNotification(body=body, received_at=now, request_id=request_id)
        if settings.webhook.archive
        else None
    )
    try:
        if len(body) > _OFF_LOOP_BYTES:
            # Decoding megabytes (or flattening a hostile nesting) must not stall the loop.
            batch = await asyncio.to_thread(extract, body, settings, now=now)
        else:
            batch = extract(body, settings, now=now)
        result = await store.capture(
            batch, window_s=settings.events.attribution_window_s, archive=new
        )
    except Exception as exc:
        log.exception("webhook_processing_failed", error_type=type(exc).__name__)
        metrics.webhook_unprocessed.labels("processing_error").inc()
        if new is None:
            raise ServiceUnavailable(
                "The notification could not be processed and the archive is off; retry.",
                code="webhook_unavailable",
            ) from None
        try:
            pk = await store.archive_pending(new, error=type(exc).__name__)
        except Exception as again:
            log.error("webhook_archive_failed", error_type=type(again).__name__)
            raise ServiceUnavailable(
                "The notification could not be stored; retry (Meta does, for 7 days).",
                code="store_unavailable",
            ) from None
        return CaptureResult(
            unprocessed=1,
            problems=[ProblemView(path=ROOT, code="processing_error", reason=_PENDING_REASON)],
            notification_id=pk,
            archive_status="pending",
        )
    _log_problems(batch, result.notification_id, metrics)
    metrics.webhook_messages.inc(result.messages)
    metrics.webhook_clicks.inc(result.clicks_captured + result.clicks_recovered)
    return result


class ReprocessReport(msgspec.Struct, kw_only=True):
    """What a reprocessing run did."""

    notifications: int = 0
    processed: int = 0
    partial: int = 0
    failed: int = 0
    skipped: int = 0
    messages: int = 0
    clicks_captured: int = 0


def _examined(
    problems: Sequence[Problem], accounts: Sequence[tuple[str, str]] | None
) -> tuple[str, ...]:
    return tuple(
        p.path
        for p in problems
        if accounts is None or any(p.account_id == a or p.phone_number_id == n for a, n in accounts)
    )


async def reprocess(
    store: Store,
    settings: Settings,
    *,
    since: float = 0.0,
    account: AccountConfig | None = None,
    statuses: Sequence[NotificationStatus] = ("partial", "pending"),
    before: float | None = None,
) -> ReprocessReport:
    """Process archived notifications again: the failed parts of partial ones, pending whole;
    only those received from ``since`` (and before ``before``, if given)."""
    report = ReprocessReport()
    accounts = None if account is None else [(account.id, account.phone_number_id)]
    after = 0
    while True:
        page = await store.open_notifications(
            since=since, accounts=accounts, statuses=statuses, after_pk=after, before=before
        )
        if not page:
            return report
        for notification in page:
            after = notification.pk
            report.notifications += 1
            examined = (
                None
                if notification.status == "pending"
                else _examined(notification.problems, accounts)
            )
            job = Reprocess(pk=notification.pk, attempts=notification.attempts, examined=examined)
            try:
                body = await store.notification_body(notification.pk)
                if body is None:
                    continue  # pruned meanwhile
                batch = extract(body, settings, now=time.time(), only=examined)
                result = await store.capture(
                    batch, window_s=settings.events.attribution_window_s, archive=job
                )
            except Exception as exc:
                log.exception(
                    "webhook_reprocess_failed",
                    notification_id=notification.pk,
                    error_type=type(exc).__name__,
                )
                await store.mark_reprocess_failed(notification.pk, type(exc).__name__)
                report.failed += 1
                continue
            report.messages += result.messages
            report.clicks_captured += result.clicks_captured + result.clicks_recovered
            if result.archive_status == "skipped":
                report.skipped += 1
            elif result.archive_status == "processed":
                report.processed += 1
            else:
                report.partial += 1
            log.info(
                "webhook_reprocessed",
                notification_id=notification.pk,
                status=result.archive_status,
                messages=result.messages,
                unprocessed=result.unprocessed,
            )
