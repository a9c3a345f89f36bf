"""The records plugins see and return: conversations, prepared events, sink states.

These are the gateway's own vocabulary, independent of HTTP and of SQLite; the store maps them
to rows and the views map them to wire Structs.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from gateway.config import AccountConfig
from gateway.wire import ConversionRequest

__all__ = [
    "STATUS_PRECEDENCE",
    "Attempt",
    "Conversation",
    "DeliveryStatus",
    "PreparedEvent",
    "Resolution",
    "Resolved",
    "SinkState",
    "StoredEvent",
    "overall_status",
]

DeliveryStatus = Literal["dry_run", "pending", "delivered", "failed", "expired"]


class Conversation(msgspec.Struct, frozen=True, kw_only=True):
    """A WhatsApp conversation of one account with one person, and its captured click.

    The person is known by phone (``wa_id``), by business-scoped user id (``bsuid``), or both
    (META.md §3b). At most one conversation per phone and per BSUID of an account is live
    (``superseded_by`` is None): that is where the person's next message goes.
    """

    id: str
    account_id: str
    created_at: float
    # The phone as WhatsApp sends it (digits with country code); None while Meta withholds it.
    wa_id: str | None = None
    bsuid: str | None = None
    parent_bsuid: str | None = None
    # The latest WhatsApp username, for display only: usernames change, never a key.
    username: str | None = None
    last_inbound_at: float | None = None
    ctwa_clid: str | None = None
    ctwa_captured_at: float | None = None
    # When the person tapped the ad: the timestamp of the message that carried the referral.
    ctwa_clicked_at: float | None = None
    ctwa_source_id: str | None = None
    ctwa_source_url: str | None = None
    ctwa_headline: str | None = None
    ctwa_source_type: str | None = None
    # How the click id was captured: "message" (a referral) or "automatic_event".
    ctwa_capture_source: str | None = None
    # The conversation that took over this one's identifiers (a new click after the
    # attribution window, two conversations found to be one person, a recycled number).
    superseded_by: str | None = None
    # When the phone passed to another person (a recycled number): from then on a conversion
    # by that phone is not this person's.
    phone_released_at: float | None = None
    # The time of the last system message that re-keyed it: an older one arriving late
    # must not undo it.
    keys_changed_at: float | None = None

    def click_time(self) -> float | None:
        """When the ad was clicked, as best known."""
        return self.ctwa_clicked_at or self.ctwa_captured_at


class Resolved(msgspec.Struct, frozen=True, kw_only=True):
    """What a resolver may return instead of a bare Conversation: how it found it."""

    conversation: Conversation
    # The request field that found it (camelCase), e.g. "phoneE164".
    field: str | None = None
    # Which form of the sent identifier matched the stored one (e.g. "mexico_with_1",
    # "former_number"; the identifier itself is not kept with the event).
    form: str | None = None
    # More than one person matched; the most recent conversation with a click was taken.
    ambiguous: bool = False


class Resolution(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How a conversion's conversation was found; kept with the event and shown with it."""

    resolver: str
    field: str | None = None
    form: str | None = None
    ambiguous: bool = False


class PreparedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A validated request, its conversation and the Meta event the normalizers built."""

    request: ConversionRequest
    account: AccountConfig
    conversation: Conversation
    # One element of Meta's ``data`` array, hashed fields only.
    event: dict[str, Any]
    test_event_code: str | None
    received_at: float
    # The click is older than the attribution window: Meta will take the event but will not
    # credit the ad with it.
    attribution_window_expired: bool = False
    resolution: Resolution | None = None


class SinkState(msgspec.Struct, frozen=True, kw_only=True):
    """What one sink did, or will do, with one event."""

    status: DeliveryStatus
    # The exact request body this sink sent or would send to Meta.
    payload: dict[str, Any] | None = None
    attempts: int = 0
    error: str | None = None
    error_code: str | None = None
    trace_id: str | None = None
    events_received: int = 0
    # Meta's non-fatal ``messages`` (e.g. an event_time it discarded).
    warnings: list[str] | None = None


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One try of one sink to deliver one event."""

    sink: str
    attempt: int
    at: float
    outcome: str
    http_status: int | None = None
    error_code: str | None = None
    message: str | None = None
    trace_id: str | None = None
    batch_size: int = 1
    duration_ms: float = 0.0


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An accepted event as the store holds it, with each sink's state."""

    pk: int
    account_id: str
    event_id: str
    event_name: str
    conversation_id: str
    event_time: int
    status: str
    event: dict[str, Any]
    test_event_code: str | None
    received_at: float
    duration_ms: float
    deliveries: dict[str, SinkState]
    attribution_window_expired: bool = False
    resolution: Resolution | None = None
    # Digests of the request's fields, by wire name (None for events stored before them).
    request_fields: dict[str, str] | None = None


# Which state an event shows when its sinks disagree: the one needing attention first.
STATUS_PRECEDENCE: tuple[DeliveryStatus, ...] = (
    "failed",
    "expired",
    "pending",
    "delivered",
    "dry_run",
)


def overall_status(states: dict[str, SinkState]) -> str:
    """Return the event's status from its sinks' states."""
    present = {state.status for state in states.values()}
    for status in STATUS_PRECEDENCE:
        if status in present:
            return status
    return "pending"
