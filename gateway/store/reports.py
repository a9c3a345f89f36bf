"""The reporting queries: an account's numbers for a period, the ads funnel, and health.

Every query runs on the scanning connection (aiosqlite's thread), never on the writer, and
reads through an index made for it (schema migration 7): the overview is one ordered pass over
``events_stats`` (grouped by day, status and currency without a sort), clicks and
conversations by their time indexes, the funnel per conversation through
``events_by_conversation``. The SQL is kept portable where it can be (integer division,
``COALESCE``, no ``FILTER``), for the PostgreSQL store to come.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.domain import StoredEvent
from gateway.reports import DAY_S, Period
from gateway.store.outbox import EventsWhere
from gateway.store.rows import Money
from gateway.store.sql import Reader, Tx

__all__ = ["AdTally", "DayTally", "EventFilter", "Reports", "count_in_hours"]

HOUR_S = 3600
_ADD_TO_HOURS = (
    "INSERT INTO event_hours (account_id, hour, event_name, status, currency, expired, events,"
    " value) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (account_id, hour, event_name, status, currency, expired) DO UPDATE SET"
    " events = event_hours.events + excluded.events, value = event_hours.value + excluded.value"
)


async def count_in_hours(tx: Tx, events: Sequence[tuple[StoredEvent, Money]]) -> None:
    """Add newly stored events, each with its ``status`` and its :func:`value_and_currency`
    (worked out once, for its row), to ``event_hours``, in the transaction that stores them:
    one statement per distinct hour, name, status and currency of the batch (usually one), in
    key order (replicas adding to the same rows at once take their locks in one order).
    Test events (sent with a test event code) are no conversions: not counted."""
    tallies: dict[tuple[str, int, str, str, str, int], list[float]] = {}
    for e, (value, currency) in events:
        if e.test_event_code is not None:
            continue
        key = (
            e.account_id,
            e.event_time // HOUR_S,
            e.event_name,
            e.status,
            currency or "",
            int(e.attribution_window_expired),
        )
        tally = tallies.get(key)
        if tally is None:
            tally = tallies[key] = [0, 0.0]
        tally[0] += 1
        tally[1] += value or 0.0
    if not tallies:
        return
    await tx.executemany(
        _ADD_TO_HOURS, [(*key, int(n), v) for key, (n, v) in sorted(tallies.items())]
    )


@dataclass(frozen=True)
class EventFilter:
    """Which events of an account: every given condition must hold. ``since``/``until``
    bound the event time; ``ad_id`` is the ad of the event's conversation."""

    account_id: str
    statuses: tuple[str, ...] = ()
    event_name: str | None = None
    since: int | None = None
    until: int | None = None
    ad_id: str | None = None
    event_ids: tuple[str, ...] = ()
    conversation_id: str | None = None
    before_pk: int | None = None

    def where(self) -> EventsWhere:
        """Return the condition on the events table, and its parameters."""
        terms: list[str] = ["account_id = ?"]
        params: list[Any] = [self.account_id]
        if self.statuses:
            terms.append(f"status IN ({','.join('?' * len(self.statuses))})")
            params += self.statuses
        if self.event_ids:
            terms.append(f"event_id IN ({','.join('?' * len(self.event_ids))})")
            params += self.event_ids
        for clause, value in (
            ("event_name = ?", self.event_name),
            ("event_time >= ?", self.since),
            ("event_time < ?", self.until),
            ("conversation_id = ?", self.conversation_id),
            ("pk < ?", self.before_pk),
        ):
            if value is not None:
                terms.append(clause)
                params.append(value)
        if self.ad_id is not None:
            terms.append(
                "conversation_id IN (SELECT id FROM conversations"
                " WHERE account_id = ? AND ctwa_source_id = ?)"
            )
            params += [self.account_id, self.ad_id]
        return " AND ".join(terms), params


@dataclass
class DayTally:
    """What the store counted for one UTC day (or the whole period)."""

    clicks: int = 0
    conversations: int = 0
    # (status, currency or None) -> (events, value, events sent outside the window)
    events: dict[tuple[str, str | None], tuple[int, float, int]] | None = None


@dataclass
class AdTally:
    """What the store counted for one ad's conversations."""

    headline: str | None = None
    source_url: str | None = None
    clicks: int = 0
    conversations: int = 0
    # Seconds from click to first conversion, one per converted conversation.
    delays: list[float] | None = None
    # (event name, status, currency or None) -> (events, value)
    events: dict[tuple[str, str, str | None], tuple[int, float]] | None = None


class Reports:
    """The reporting queries, over the store's scanning connection."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader

    async def days(self, account_id: str, period: Period) -> dict[int, DayTally]:
        """Return clicks, conversations and events per UTC day of the period."""
        found: dict[int, DayTally] = defaultdict(DayTally)
        counted = await self._events(account_id, period, _BY_DAY)
        for (day, status, currency), (count, value, expired) in counted.items():
            tally = found[int(day)]
            if tally.events is None:
                tally.events = {}
            tally.events[(str(status), _currency(currency))] = (count, value, expired)
        for column, condition, attribute in (
            ("ctwa_captured_at", " AND ctwa_clid IS NOT NULL", "clicks"),
            ("created_at", "", "conversations"),
        ):
            # The UTC day of a time: SQLite's CAST truncates (times are positive), while
            # PostgreSQL's rounds.
            day = (
                f"CAST({column} / {DAY_S} AS INTEGER)"
                if self._reader.engine == "sqlite"
                else f"CAST(FLOOR({column} / {DAY_S}) AS BIGINT)"
            )
            rows = await self._reader.fetch(
                f"SELECT {day}, COUNT(*) FROM conversations"
                f" WHERE account_id = ?{condition} AND {column} >= ? AND {column} < ?"
                " GROUP BY 1",
                (account_id, period.since, period.until),
            )
            for day, count in rows:
                setattr(found[day], attribute, count)
        return dict(found)

    async def event_names(
        self, account_id: str, period: Period
    ) -> dict[tuple[str, str, str | None], tuple[int, float]]:
        """Return (events, value) per (event name, status, currency) in the period."""
        counted = await self._events(account_id, period, _BY_NAME)
        return {
            (str(name), str(status), _currency(currency)): (count, value)
            for (name, status, currency), (count, value, _) in counted.items()
        }

    async def _events(
        self, account_id: str, period: Period, by: tuple[str, str]
    ) -> dict[tuple[Any, ...], tuple[int, float, int]]:
        """(events, value, events past the window) per group (``_BY_DAY`` or ``_BY_NAME``)
        of the period's events but test events: its whole UTC hours from event_hours, the
        partial hours at either end (or a period within one hour) from the events
        themselves."""
        hourly, direct = by
        first = -(-period.since // HOUR_S)  # the first whole hour
        last = period.until // HOUR_S  # the hour the period ends in (excluded)
        queries: list[tuple[str, tuple[object, ...]]] = []
        if first < last:
            queries.append(
                (
                    f"SELECT {hourly}, SUM(events), SUM(value),"
                    " SUM(CASE WHEN expired != 0 THEN events ELSE 0 END) FROM event_hours"
                    " WHERE account_id = ? AND hour >= ? AND hour < ? GROUP BY 1, 2, 3",
                    (account_id, first, last),
                )
            )
            edges = [(period.since, first * HOUR_S), (last * HOUR_S, period.until)]
        else:
            edges = [(period.since, period.until)]
        for since, until in edges:
            if since < until:
                queries.append(
                    (
                        f"SELECT {direct}, COUNT(*), COALESCE(SUM(custom_value), 0),"
                        " SUM(attribution_window_expired) FROM events"
                        " WHERE account_id = ? AND event_time >= ? AND event_time < ?"
                        " AND test_event_code IS NULL GROUP BY 1, 2, 3",
                        (account_id, since, until),
                    )
                )
        totals: dict[tuple[Any, ...], tuple[int, float, int]] = {}
        for sql, params in queries:
            for *key, count, value, expired in await self._reader.fetch(sql, params):
                before = totals.get(tuple(key), (0, 0.0, 0))
                totals[tuple(key)] = (
                    before[0] + int(count),
                    before[1] + float(value or 0),
                    before[2] + int(expired or 0),
                )
        # A status an event left behind keeps its row in event_hours at zero.
        return {key: tally for key, tally in totals.items() if tally[0]}

    async def test_events(self, account_id: str, period: Period) -> int:
        """Return how many test events (sent with a test event code) the period holds: no
        conversions, so counted nowhere else."""
        rows = await self._reader.fetch(
            "SELECT COUNT(*) FROM events WHERE account_id = ? AND event_time >= ?"
            " AND event_time < ? AND test_event_code IS NOT NULL",
            (account_id, period.since, period.until),
        )
        return int(rows[0][0])

    async def ads(self, account_id: str, period: Period) -> dict[str | None, AdTally]:
        """Return the funnel of the conversations started in the period, per ad (None:
        without an ad), with every conversion they brought, whenever it happened (test
        events are none)."""
        found: dict[str | None, AdTally] = defaultdict(AdTally)
        params = (account_id, period.since, period.until)
        rows = await self._reader.fetch(
            "SELECT c.ctwa_source_id, c.ctwa_headline, c.ctwa_source_url,"
            " c.ctwa_clid IS NOT NULL, COALESCE(c.ctwa_clicked_at, c.ctwa_captured_at,"
            " c.created_at), (SELECT MIN(e.event_time) FROM events e"
            " WHERE e.conversation_id = c.id AND e.test_event_code IS NULL)"
            " FROM conversations c WHERE c.account_id = ? AND c.created_at >= ?"
            " AND c.created_at < ?",
            params,
        )
        for ad, headline, url, clicked, clicked_at, first in rows:
            tally = found[ad]
            tally.conversations += 1
            tally.clicks += clicked
            # The newest non-empty headline and link (rows come in no particular order,
            # so any of the ad's; they are the same ad's).
            tally.headline = tally.headline or headline
            tally.source_url = tally.source_url or url
            if first is not None:
                if tally.delays is None:
                    tally.delays = []
                tally.delays.append(max(0.0, first - clicked_at))
        events = await self._reader.fetch(
            "SELECT c.ctwa_source_id, e.event_name, e.status, e.custom_currency, COUNT(*),"
            " SUM(e.custom_value) FROM conversations c"
            " JOIN events e ON e.conversation_id = c.id"
            " WHERE c.account_id = ? AND c.created_at >= ? AND c.created_at < ?"
            " AND e.test_event_code IS NULL GROUP BY 1, 2, 3, 4",
            params,
        )
        for ad, name, status, currency, count, value in events:
            tally = found[ad]
            if tally.events is None:
                tally.events = {}
            tally.events[(name, status, _currency(currency))] = (count, float(value or 0))
        return dict(found)

    async def outbox(self, account_id: str) -> dict[str, tuple[int, float]]:
        """Return (pending deliveries, oldest pending event's receipt) per sink."""
        rows = await self._reader.fetch(
            "SELECT d.sink, COUNT(*), MIN(e.received_at) FROM deliveries d"
            " JOIN events e ON e.pk = d.event_pk"
            " WHERE d.status = 'pending' AND e.account_id = ? GROUP BY d.sink",
            (account_id,),
        )
        return {sink: (count, oldest) for sink, count, oldest in rows}

    async def last_error(self, account_id: str, sink: str) -> Sequence[Any] | None:
        """Return the latest attempt of ``sink`` for the account that did not deliver:
        (at, event id, outcome, http status, error code, message, trace id)."""
        rows = await self._reader.fetch(
            "SELECT a.at, e.event_id, a.outcome, a.http_status, a.error_code, a.message,"
            " a.trace_id FROM delivery_attempts a JOIN events e ON e.pk = a.event_pk"
            " WHERE a.outcome != 'delivered' AND a.sink = ? AND e.account_id = ?"
            " ORDER BY a.at DESC LIMIT 1",
            (sink, account_id),
        )
        return rows[0] if rows else None

    async def webhook_problems(self, account_id: str) -> int:
        """Return the unprocessed webhook parts naming this account, still open."""
        rows = await self._reader.fetch(
            "SELECT COUNT(*) FROM webhook_problems p"
            " JOIN webhook_notifications n ON n.pk = p.notification_pk"
            " WHERE p.account_id = ? AND n.status != 'processed'",
            (account_id,),
        )
        return int(rows[0][0])


# The groups of Reports._events: (from event_hours, from events).
_BY_DAY = (
    "hour / 24, status, currency",
    "event_time / 86400, status, COALESCE(custom_currency, '')",
)
_BY_NAME = ("event_name, status, currency", "event_name, status, COALESCE(custom_currency, '')")


def _currency(value: object) -> str | None:
    """A stored currency code, or None for an event without one."""
    return value if isinstance(value, str) and value else None
