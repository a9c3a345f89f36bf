"""Map stored outcomes to the wire Structs of Zernio's response shapes."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.domain import Attempt, Conversation, Resolution, SinkState, StoredEvent
from gateway.pipeline import Outcome
from gateway.wire import (
    AttemptView,
    ConversationMetadata,
    ConversationView,
    ConversionResponse,
    DeliveryDetail,
    DeliveryView,
    EventDetail,
    EventSummary,
    Failure,
    ResolutionView,
)

__all__ = [
    "PLATFORM",
    "answer_status",
    "conversation_view",
    "conversion_response",
    "event_detail",
    "event_summary",
    "iso_time",
    "resolution_view",
]

# Zernio's platform tag for Meta's conversion endpoints.
PLATFORM = "metaads"


def iso_time(ts: float) -> str:
    """Return ``ts`` as an ISO 8601 UTC timestamp with milliseconds."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso(ts: float | None) -> str | None:
    """Return a stored time from Meta as ISO 8601, or None if it is not a representable time.

    Older versions stored message timestamps as sent; one in milliseconds (year 58870) must
    not break every read of its account.
    """
    if ts is None:
        return None
    try:
        return iso_time(ts)
    except (ValueError, OverflowError, OSError):
        return None


def _reported(event: StoredEvent, primary: str) -> dict[str, SinkState]:
    """The states the Zernio-shaped fields come from: the primary sink's, or every sink's for
    an event stored before that sink was configured."""
    state = event.deliveries.get(primary)
    return {primary: state} if state is not None else event.deliveries


def _status(event: StoredEvent, primary: str) -> str:
    state = event.deliveries.get(primary)
    return event.status if state is None else state.status


def _counts(event: StoredEvent, primary: str) -> tuple[int, int, list[Failure], str | None]:
    state = event.deliveries.get(primary)
    if state is not None and state.status not in _FAILED:
        # The usual answer (one sink's state, nothing failed), told without the loops below.
        return state.events_received, 0, [], state.trace_id or None
    states = _reported(event, primary)
    received = max((s.events_received for s in states.values()), default=0)
    failures = [
        Failure(
            event_index=0,
            event_id=event.event_id,
            message=f"{sink}: {state.error or state.status}",
            code=state.error_code or state.status,
        )
        for sink, state in states.items()
        if state.status in _FAILED
    ]
    trace = next((s.trace_id for s in states.values() if s.trace_id), None)
    return received, 1 if failures else 0, failures, trace


_FAILED = ("failed", "expired")


def answer_status(outcome: Outcome) -> int:
    """The HTTP status of a conversion's answer: 202 while the primary sink has not yet
    delivered (queued, retrying), else 200. Other sinks never change it."""
    return 202 if _status(outcome.event, outcome.primary) == "pending" else 200


def conversion_response(outcome: Outcome) -> ConversionResponse:
    """Return the answer to ``POST /v1/whatsapp/conversions``: Zernio's fields from the
    primary sink, every sink's own state in ``deliveries``."""
    event = outcome.event
    received, failed, failures, trace = _counts(event, outcome.primary)
    status = _status(event, outcome.primary)
    return ConversionResponse(
        platform=PLATFORM,
        events_received=received,
        events_failed=failed,
        failures=failures,
        trace_id=trace,
        event_id=event.event_id,
        # Zernio's word for "accepted, not yet delivered"; the history says pending.
        status="queued" if status == "pending" else status,
        duplicate=outcome.duplicate,
        conversation_id=event.conversation_id,
        deliveries=[
            DeliveryView(
                sink=sink,
                status=state.status,
                attempts=state.attempts,
                error=state.error,
                trace_id=state.trace_id,
            )
            for sink, state in event.deliveries.items()
        ],
        attribution_window_expired=event.attribution_window_expired,
        payload=outcome.dry_run_payload,
        resolution=resolution_view(event.resolution),
    )


def resolution_view(resolution: Resolution | None) -> ResolutionView | None:
    """Return how a conversation was found, as the API shows it."""
    if resolution is None:
        return None
    return ResolutionView(
        resolver=resolution.resolver,
        field=resolution.field,
        form=resolution.form,
        ambiguous=resolution.ambiguous,
    )


def event_summary(event: StoredEvent, primary: str) -> EventSummary:
    """Return one row of the conversions history: Zernio's fields and ``status`` from the
    primary sink, as the answer to the request had them (the event's detail lists every
    sink's state)."""
    received, failed, _, trace = _counts(event, primary)
    return EventSummary(
        timestamp=iso_time(event.received_at),
        event_name=event.event_name,
        conversation_id=event.conversation_id,
        events_received=received,
        events_failed=failed,
        trace_id=trace,
        duration_ms=event.duration_ms,
        event_id=event.event_id,
        status=_status(event, primary),
        attribution_window_expired=event.attribution_window_expired,
        attempts=max((s.attempts for s in event.deliveries.values()), default=0),
        error=next((s.error for s in event.deliveries.values() if s.error), None),
        resolution=resolution_view(event.resolution),
    )


def event_detail(event: StoredEvent, attempts: list[Attempt]) -> EventDetail:
    """Return one event with each sink's state and every attempt."""
    return EventDetail(
        event_id=event.event_id,
        account_id=event.account_id,
        event_name=event.event_name,
        conversation_id=event.conversation_id,
        status=event.status,
        timestamp=iso_time(event.received_at),
        event_time=event.event_time,
        attribution_window_expired=event.attribution_window_expired,
        deliveries=[
            DeliveryDetail(
                sink=sink,
                status=s.status,
                attempts=s.attempts,
                error=s.error,
                error_code=s.error_code,
                trace_id=s.trace_id,
                warnings=s.warnings,
            )
            for sink, s in event.deliveries.items()
        ],
        attempts=[
            AttemptView(
                sink=a.sink,
                attempt=a.attempt,
                at=iso_time(a.at),
                outcome=a.outcome,
                http_status=a.http_status,
                error_code=a.error_code,
                message=a.message,
                trace_id=a.trace_id,
                batch_size=a.batch_size,
                duration_ms=a.duration_ms,
            )
            for a in attempts
        ],
        event=event.event,
        test_event_code=event.test_event_code,
        resolution=resolution_view(event.resolution),
    )


def conversation_view(conversation: Conversation) -> ConversationView:
    """Return a conversation as the conversations API shows it."""
    c = conversation
    return ConversationView(
        id=c.id,
        account_id=c.account_id,
        phone_e164=c.wa_id,
        business_scoped_user_id=c.bsuid,
        parent_business_scoped_user_id=c.parent_bsuid,
        username=c.username,
        superseded_by=c.superseded_by,
        metadata=ConversationMetadata(
            ctwa_clid=c.ctwa_clid,
            ctwa_captured_at=_iso(c.ctwa_captured_at),
            ctwa_clicked_at=_iso(c.ctwa_clicked_at),
            ctwa_source_id=c.ctwa_source_id,
            ctwa_source_url=c.ctwa_source_url,
            ctwa_headline=c.ctwa_headline,
            ctwa_source_type=c.ctwa_source_type,
            ctwa_capture_source=c.ctwa_capture_source,
        ),
        created_at=iso_time(c.created_at),
        last_inbound_at=_iso(c.last_inbound_at),
    )
