"""The reporting API's shapes (stats, health, replay) and the pure arithmetic behind them.

The console renders these same Structs, so every number on its pages is one an integrator
gets from ``GET /v1/whatsapp/stats`` (and friends). Periods are half-open ``[since, until)``
in UTC; a day is a UTC calendar day (``event_time // 86400``).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec

from gateway.errors import InvalidRequest
from gateway.wire import PRINTABLE, EventId, WireStruct

__all__ = [
    "DAY_S",
    "MAX_PERIOD_S",
    "AdRow",
    "DayRow",
    "EventNameRow",
    "HealthAnswer",
    "LastError",
    "Money",
    "OutboxDepth",
    "Period",
    "ReplayAnswer",
    "ReplayRequest",
    "StatsAnswer",
    "StatusCounts",
    "Totals",
    "WebhookBacklog",
    "day_key",
    "median",
    "money",
    "parse_period",
    "parse_time",
    "share",
]

DAY_S = 86400
# The longest period one stats call covers (a year and a month).
MAX_PERIOD_S = 400 * DAY_S

GroupBy = Literal["day", "ad", "eventName"]
ReplayStatus = Literal["failed", "expired"]


class Period(msgspec.Struct, frozen=True):
    """``[since, until)`` in Unix seconds."""

    since: int
    until: int

    def days(self) -> list[int]:
        """The UTC day numbers (``t // 86400``) the period touches, oldest first."""
        return list(range(self.since // DAY_S, (self.until - 1) // DAY_S + 1))


_TIME_HINT = (
    "as an ISO 8601 date or UTC time, e.g. 2026-11-24 or 2026-11-24T18:30:00Z"
    " (an offset such as +02:00 works too)"
)


def parse_time(value: str, param: str) -> int:
    """Return an ISO 8601 date (midnight UTC) or date-time with a zone as Unix seconds, or
    raise 400 naming ``param``."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"Invalid `{param}`: {value[:64]!r} is not a date or time; send it {_TIME_HINT}.",
            code="invalid_field",
            param=param,
        ) from None
    if len(value) > 10 and parsed.tzinfo is None:
        raise InvalidRequest(
            f"Invalid `{param}`: {value[:64]!r} has no time zone; add Z for UTC or an offset"
            " such as +02:00.",
            code="invalid_field",
            param=param,
        )
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    seconds = parsed.timestamp()
    if not 0 <= seconds < 1e11:
        raise InvalidRequest(
            f"Invalid `{param}`: {value[:64]!r} is out of range; send it {_TIME_HINT}.",
            code="invalid_field",
            param=param,
        )
    return int(seconds)


def parse_period(
    since: str | None, until: str | None, *, now: float, default_s: int = 7 * DAY_S
) -> Period:
    """Return the period ``[since, until)``; ``until`` defaults to now and ``since`` to
    ``default_s`` before it. Raise 400 naming the parameter that is wrong."""
    end = int(now) + 1 if until is None else parse_time(until, "until")
    start = end - default_s if since is None else parse_time(since, "since")
    if start >= end:
        raise InvalidRequest(
            "`since` must be before `until` (the period is [since, until)).",
            code="invalid_field",
            param="since",
        )
    if end - start > MAX_PERIOD_S:
        raise InvalidRequest(
            f"The period is too long: at most {MAX_PERIOD_S // DAY_S} days between `since`"
            " and `until`.",
            code="invalid_field",
            param="since",
        )
    return Period(start, end)


def day_key(day: int) -> str:
    """Return a UTC day number as ``YYYY-MM-DD``."""
    return datetime.fromtimestamp(day * DAY_S, UTC).strftime("%Y-%m-%d")


class StatusCounts(msgspec.Struct, rename="camel", kw_only=True):
    """Conversions by status (every event has exactly one)."""

    delivered: int = 0
    failed: int = 0
    pending: int = 0
    expired: int = 0
    dry_run: int = 0

    def add(self, status: str, count: int) -> None:
        """Count ``count`` events of ``status`` (an unknown status counts as pending)."""
        name = status if status in _STATUSES else "pending"
        setattr(self, name, getattr(self, name) + count)

    def total(self) -> int:
        return self.delivered + self.failed + self.pending + self.expired + self.dry_run


_STATUSES = frozenset(StatusCounts.__struct_fields__)


class Money(WireStruct, frozen=True):
    """A sum of conversion values in one currency."""

    currency: str
    value: float


def money(sums: dict[str, float]) -> list[Money]:
    """Return per-currency sums as a list, largest first (cents rounded)."""
    return [
        Money(currency=c, value=round(v, 2))
        for c, v in sorted(sums.items(), key=lambda item: (-item[1], item[0]))
    ]


def share(part: int, whole: int) -> float | None:
    """Return ``part / whole`` to four places, or None when there is nothing to divide."""
    return round(part / whole, 4) if whole else None


def median(values: Iterable[float]) -> float | None:
    """Return the median, or None for no values."""
    found = list(values)
    return round(statistics.median(found), 1) if found else None


class Totals(WireStruct, frozen=True):
    """An account's numbers for a period."""

    # Click ids captured in the period (conversations, by when the click was captured).
    clicks: int
    # Conversations started in the period (with or without an ad).
    conversations: int
    # Conversions whose event time is in the period, by status; ``events`` is their sum.
    # Test events (sent with a test event code) are none: Meta counts them nowhere.
    conversions: StatusCounts
    events: int
    value: list[Money]
    # Of those, sent with a click inside the attribution window (Meta credits the ad).
    within_window: int
    within_window_share: float | None
    # Test events whose event time is in the period, left out of every number above.
    test_events: int


class DayRow(WireStruct, frozen=True):
    """One UTC day of the period."""

    day: str
    clicks: int
    conversations: int
    conversions: StatusCounts
    value: list[Money]


class EventNameRow(WireStruct, frozen=True):
    """Conversions of one event name in the period."""

    event_name: str
    conversions: StatusCounts
    events: int
    value: list[Money]


class AdRow(WireStruct, frozen=True):
    """One ad's funnel: the conversations it started in the period and what they brought.

    ``adId`` is the referral's ``source_id`` (None: conversations that came without an ad).
    """

    ad_id: str | None
    headline: str | None
    source_url: str | None
    clicks: int
    conversations: int
    # Conversations with at least one conversion; ``conversionRate`` = converted / conversations.
    converted: int
    conversion_rate: float | None
    conversions: StatusCounts
    events: int
    by_event_name: dict[str, int]
    value: list[Money]
    # From the click (or the conversation's start) to its first conversion, median seconds.
    median_click_to_conversion_s: float | None


class StatsAnswer(WireStruct, frozen=True, omit_defaults=True):
    """``GET /v1/whatsapp/stats``: the period's totals and one list of groups."""

    account_id: str
    since: str
    until: str
    group_by: GroupBy
    totals: Totals
    days: list[DayRow] | None = None
    ads: list[AdRow] | None = None
    event_names: list[EventNameRow] | None = None


class OutboxDepth(WireStruct, frozen=True):
    """A sink's pending deliveries of the account."""

    sink: str
    pending: int
    oldest_pending_age_s: float | None


class LastError(WireStruct, frozen=True):
    """The latest refused or retried attempt of a sink for the account."""

    sink: str
    dataset_id: str | None
    at: str
    event_id: str
    outcome: str
    http_status: int | None
    error_code: str | None
    message: str | None
    trace_id: str | None


class WebhookBacklog(WireStruct, frozen=True):
    """Webhook notifications not fully processed (``ctwa-gateway webhooks list``)."""

    # Unprocessed parts that name this account.
    account_problems: int
    # Every account's notifications (keys for all accounts only; else null).
    partial: int | None
    pending: int | None


class HealthAnswer(WireStruct, frozen=True):
    """``GET /v1/whatsapp/health``: what may need an operator's attention."""

    account_id: str
    outbox: list[OutboxDepth]
    last_errors: list[LastError]
    webhooks: WebhookBacklog
    # The store's files (database and write-ahead log), for keys for all accounts only.
    store_bytes: int | None


Timestamp = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class ReplayRequest(WireStruct, frozen=True):
    """``POST /v1/whatsapp/replay``: make matching failed (or expired) deliveries pending.

    Filters combine (all must match); ``dryRun`` counts without changing anything.
    """

    account_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    status: Annotated[list[ReplayStatus], msgspec.Meta(min_length=1, max_length=2)] = msgspec.field(
        default_factory=lambda: ["failed"]
    )
    # Ids as the conversions endpoint takes them (no control or invisible characters).
    event_ids: Annotated[list[EventId], msgspec.Meta(min_length=1, max_length=1000)] | None = None
    # Held to the rule of every identifier: a NUL (which PostgreSQL cannot compare) or an
    # invisible character is a 400 naming the field, not a match for nothing.
    event_name: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=PRINTABLE)] | None
    ) = None
    ad_id: Annotated[str, msgspec.Meta(min_length=1, max_length=2048, pattern=PRINTABLE)] | None = (
        None
    )
    since: Timestamp | None = None
    until: Timestamp | None = None
    dry_run: bool = False


class ReplayAnswer(WireStruct, frozen=True):
    """How many events matched and how many were re-queued (0 on a dry run)."""

    matched: int
    requeued: int
    dry_run: bool
    sinks: list[str]
