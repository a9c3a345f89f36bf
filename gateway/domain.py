"""The records plugins see and return: conversations, events, sink states and outcomes.

These are the gateway's own vocabulary, independent of HTTP and of SQLite; the store maps them
to rows and the views map them to wire Structs. One record per concept: a request becomes a
:class:`PreparedEvent` (not stored yet), then a :class:`StoredEvent` (``pk`` 0 until the store
assigns one); a sink that sends through the outbox sees it as a :class:`QueuedEvent` and
answers each with a :class:`SendOutcome`.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from gateway.config import AccountConfig
from gateway.wire import ConversionRequest

__all__ = [
    "STATUS_PRECEDENCE",
    "Attempt",
    "Conversation",
    "DeliveryOptions",
    "DeliveryStatus",
    "PhoneMatch",
    "PreparedEvent",
    "QueuedEvent",
    "Resolution",
    "Resolved",
    "SendOutcome",
    "SinkState",
    "StoredEvent",
    "new_conversation_id",
    "overall_status",
]

DeliveryStatus = Literal["dry_run", "pending", "delivered", "failed", "expired"]


def new_conversation_id() -> str:
    """Return a fresh, unguessable conversation id."""
    return "conv_" + secrets.token_hex(12)


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


class PhoneMatch(NamedTuple):
    """A conversation found by phone: which stored number matched, and whether that number
    is one the person had before a change (an alias, and when it was replaced)."""

    conversation: Conversation
    matched: str
    former: bool
    replaced_at: float | None = None


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
    """An accepted event as the store holds it, with each sink's state.

    ``pk`` is 0 on the way in: :meth:`Store.insert_event` returns it with the key it got.
    """

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


class QueuedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event waiting in the outbox for one sink: what sending it needs.

    ``event`` is one element of Meta's ``data`` array (hashed fields only);
    ``attempts`` is how many tries this sink has already made.
    """

    pk: int
    account_id: str
    event_id: str
    event_name: str
    event: dict[str, Any]
    test_event_code: str | None
    event_time: int
    attempts: int


SendStatus = Literal["delivered", "retry", "failed"]


class SendOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What became of one event a sink was asked to send (:func:`gateway_send_events`).

    - ``delivered``: the destination took it (``trace_id``, ``warnings`` are kept with it);
    - ``retry``: not this time; the host retries with exponential backoff, no sooner than
      ``retry_after_s`` if given, until the sink's ``max_age_s``, then the event expires.
      ``hold_account`` holds every pending delivery of the event's account for this sink as
      long, and those accepted meanwhile (throttling: the destination asked the whole account
      to slow down);
    - ``failed``: never going to work as sent; ``reason`` says why and what to fix, and the
      operator can ``replay`` it after fixing that.
    """

    status: SendStatus
    # What went wrong and how to fix it (retry, failed); shown to the API's callers.
    reason: str | None = None
    # A short code for the reason: the destination's own ("100/2804087", "http_500").
    code: str | None = None
    retry_after_s: float | None = None
    hold_account: bool = False
    trace_id: str | None = None
    http_status: int | None = None
    # Non-fatal remarks the destination made about a delivered event.
    warnings: list[str] | None = None
    # Requests this outcome took (a batch split to find a bad event counts each).
    tries: int = 1
    duration_ms: float = 0.0


class DeliveryOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the host's outbox drives one sink (:func:`gateway_delivery_options`).

    A sink returns these from its settings; the defaults suit a sink that sends one event per
    request. Embed it in a plugin's ``Config`` to let operators tune it from ``config.toml``.
    """

    # Events per gateway_send_events call; the sink decides how many requests that takes.
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    # Whether each call holds one account's events of one test_event_code (what one request
    # to Meta can carry): a batch of several is then one call for each, at once, each call's
    # outcomes recorded as soon as it returns (one account's fault or slowness costs the
    # others nothing). False: one call per batch, max_in_flight calls at once.
    call_per_account: bool = False
    # How long a partial batch may wait to fill while others are in flight.
    linger_ms: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    # Batches sent at once.
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    retry_base_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 2.0
    retry_cap_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 600.0
    # Past this age (from the event's time) an event expires instead of being sent.
    max_age_s: Annotated[int, msgspec.Meta(ge=60, le=90 * 86400)] = 7 * 86400
    # How long a conversion request waits for its event's first attempt before answering 202.
    respond_within_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 3000
    # The longest one gateway_send_events call may take; None: [plugins] sink_timeout_s.
    send_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] | None = None
    # How long batches in flight may finish at shutdown before they are cancelled.
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0, le=300)] = 10.0
    # The longest an idle dispatcher sleeps: work another process queued (``replay``) is
    # picked up within this many seconds.
    poll_s: Annotated[float, msgspec.Meta(ge=0.05, le=300)] = 5.0
    # How long a claim on a delivery lasts unless renewed (every third of it while the send is
    # in flight): a process killed mid-send leaves its events to others after this long.
    claim_lease_s: Annotated[float, msgspec.Meta(ge=1, le=600)] = 10.0


# Which state an event shows when its sinks disagree: the one needing attention first.
STATUS_PRECEDENCE: tuple[DeliveryStatus, ...] = (
    "failed",
    "expired",
    "pending",
    "delivered",
    "dry_run",
)
_PRECEDENCE = frozenset(STATUS_PRECEDENCE)


def overall_status(states: dict[str, SinkState]) -> str:
    """Return the event's status from its sinks' states."""
    if len(states) == 1:  # the usual case, told without a set
        (state,) = states.values()
        return state.status if state.status in _PRECEDENCE else "pending"
    present = {state.status for state in states.values()}
    for status in STATUS_PRECEDENCE:
        if status in present:
            return status
    return "pending"
