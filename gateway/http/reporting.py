"""The answers of the reporting API, built from what the store counted.

One place computes each number: the JSON endpoints (:mod:`gateway.http.report_views`) and
the console's pages call the same functions, so a page never shows a number the API would
not give.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import msgspec
import structlog

from gateway.config import AccountConfig
from gateway.http.query import EventFilters
from gateway.http.render import iso_time
from gateway.pipeline import Pipeline
from gateway.plugin_manager import Plugins
from gateway.reports import (
    MAX_PERIOD_S,
    AdRow,
    DayRow,
    EventNameRow,
    GroupBy,
    HealthAnswer,
    LastError,
    OutboxDepth,
    Period,
    ReplayAnswer,
    ReplayRequest,
    StatsAnswer,
    StatusCounts,
    Totals,
    WebhookBacklog,
    day_key,
    median,
    money,
    parse_period,
    share,
)
from gateway.store.database import Store
from gateway.store.reports import DayTally, EventFilter

__all__ = ["events_filter", "health_answer", "replay", "replay_filter", "stats_answer"]

log = structlog.get_logger()


def _status_and_money(
    items: Iterable[tuple[str, str | None, int, float]],
) -> tuple[StatusCounts, dict[str, float]]:
    counts = StatusCounts()
    values: dict[str, float] = defaultdict(float)
    for status, currency, count, value in items:
        counts.add(status, count)
        if currency is not None:
            values[currency] += value
    return counts, dict(values)


def _totals(days: dict[int, DayTally], test_events: int) -> Totals:
    items = [
        (status, currency, count, value)
        for tally in days.values()
        for (status, currency), (count, value, _) in (tally.events or {}).items()
    ]
    counts, values = _status_and_money(items)
    expired = sum(e for t in days.values() for (_, _, e) in (t.events or {}).values())
    events = counts.total()
    return Totals(
        clicks=sum(t.clicks for t in days.values()),
        conversations=sum(t.conversations for t in days.values()),
        conversions=counts,
        events=events,
        value=money(values),
        within_window=events - expired,
        within_window_share=share(events - expired, events),
        test_events=test_events,
    )


def _day_rows(period: Period, days: dict[int, DayTally]) -> list[DayRow]:
    rows = []
    for day in period.days():
        tally = days.get(day, DayTally())
        counts, values = _status_and_money(
            (status, currency, count, value)
            for (status, currency), (count, value, _) in (tally.events or {}).items()
        )
        rows.append(
            DayRow(
                day=day_key(day),
                clicks=tally.clicks,
                conversations=tally.conversations,
                conversions=counts,
                value=money(values),
            )
        )
    return rows


async def _ad_rows(store: Store, account_id: str, period: Period) -> list[AdRow]:
    rows = []
    for ad, tally in (await store.reports.ads(account_id, period)).items():
        events = tally.events or {}
        counts, values = _status_and_money(
            (status, currency, count, value)
            for (_, status, currency), (count, value) in events.items()
        )
        by_name: dict[str, int] = defaultdict(int)
        for (name, _, _), (count, _) in events.items():
            by_name[name] += count
        converted = len(tally.delays or [])
        rows.append(
            AdRow(
                ad_id=ad,
                headline=tally.headline,
                source_url=tally.source_url,
                clicks=tally.clicks,
                conversations=tally.conversations,
                converted=converted,
                conversion_rate=share(converted, tally.conversations),
                conversions=counts,
                events=counts.total(),
                by_event_name=dict(sorted(by_name.items())),
                value=money(values),
                median_click_to_conversion_s=median(tally.delays or []),
            )
        )
    # Most conversions first; ads before "without an ad" on a tie.
    rows.sort(key=lambda r: (-r.events, -r.conversations, r.ad_id is None, r.ad_id or ""))
    return rows


async def _event_name_rows(store: Store, account_id: str, period: Period) -> list[EventNameRow]:
    found: dict[str, list[tuple[str, str | None, int, float]]] = defaultdict(list)
    for (name, status, currency), (count, value) in (
        await store.reports.event_names(account_id, period)
    ).items():
        found[name].append((status, currency, count, value))
    rows = []
    for name, items in sorted(found.items()):
        counts, values = _status_and_money(items)
        rows.append(
            EventNameRow(
                event_name=name, conversions=counts, events=counts.total(), value=money(values)
            )
        )
    return rows


async def stats_answer(
    store: Store,
    account_id: str,
    *,
    since: str | None,
    until: str | None,
    group_by: GroupBy,
    now: float,
) -> StatsAnswer:
    """Return the account's numbers for the period, grouped as asked."""
    period = parse_period(since, until, now=now)
    days = await store.reports.days(account_id, period)
    answer = StatsAnswer(
        account_id=account_id,
        since=iso_time(period.since),
        until=iso_time(period.until),
        group_by=group_by,
        totals=_totals(days, await store.reports.test_events(account_id, period)),
    )
    replace = msgspec.structs.replace
    if group_by == "day":
        return replace(answer, days=_day_rows(period, days))
    if group_by == "ad":
        return replace(answer, ads=await _ad_rows(store, account_id, period))
    return replace(answer, event_names=await _event_name_rows(store, account_id, period))


async def health_answer(
    pipeline: Pipeline,
    plugins: Plugins,
    account: AccountConfig,
    *,
    every_account: bool,
    now: float,
) -> HealthAnswer:
    """Return what may need attention on the account; store-wide figures only for a key
    that covers every account (``every_account``)."""
    store = pipeline.store
    depth = await store.reports.outbox(account.id)
    outbox = [
        OutboxDepth(
            sink=sink,
            pending=depth.get(sink, (0, 0.0))[0],
            oldest_pending_age_s=(
                round(max(0.0, now - depth[sink][1]), 1) if sink in depth else None
            ),
        )
        for sink in plugins.outbox_sinks
    ]
    datasets = await store.datasets()
    errors = []
    for sink in plugins.outbox_sinks:
        row = await store.reports.last_error(account.id, sink)
        if row is not None:
            at, event_id, outcome, http_status, code, message, trace = row
            errors.append(
                LastError(
                    sink=sink,
                    dataset_id=account.dataset_id or datasets.get(account.id),
                    at=iso_time(at),
                    event_id=event_id,
                    outcome=outcome,
                    http_status=http_status,
                    error_code=code,
                    message=message,
                    trace_id=trace,
                )
            )
    archive = await store.archive_counts() if every_account else {}
    return HealthAnswer(
        account_id=account.id,
        outbox=outbox,
        last_errors=errors,
        webhooks=WebhookBacklog(
            account_problems=await store.reports.webhook_problems(account.id),
            partial=archive.get("partial", 0) if every_account else None,
            pending=archive.get("pending", 0) if every_account else None,
        ),
        store_bytes=await store.size_bytes() if every_account else None,
    )


def events_filter(account_id: str, query: EventFilters, *, now: float) -> EventFilter:
    """Return the events a list query asks for (a period only if it names a bound)."""
    since = until = None
    if query.since is not None or query.until is not None:
        period = parse_period(query.since, query.until, now=now, default_s=MAX_PERIOD_S)
        since, until = period.since, period.until
    return EventFilter(
        account_id=account_id,
        statuses=(query.status,) if query.status else (),
        event_name=query.event_name,
        since=since,
        until=until,
        ad_id=query.ad_id,
    )


def replay_filter(request: ReplayRequest, *, now: float) -> EventFilter:
    """Return the events a replay request names (its statuses are the deliveries')."""
    since = until = None
    if request.since is not None or request.until is not None:
        period = parse_period(request.since, request.until, now=now, default_s=MAX_PERIOD_S)
        since, until = period.since, period.until
    return EventFilter(
        account_id=request.account_id,
        event_name=request.event_name,
        since=since,
        until=until,
        ad_id=request.ad_id,
        event_ids=tuple(request.event_ids or ()),
    )


async def replay(
    store: Store, plugins: Plugins, request: ReplayRequest, *, now: float
) -> ReplayAnswer:
    """Re-queue (or, on a dry run, count) the matching failed or expired deliveries of
    every sink with an outbox."""
    events = replay_filter(request, now=now).where()
    sinks = plugins.outbox_sinks
    if request.dry_run:
        matched = await store.outbox.replayable(sinks=sinks, statuses=request.status, events=events)
        return ReplayAnswer(matched=matched, requeued=0, dry_run=True, sinks=sinks)
    requeued, _ = await store.outbox.replay(sinks=sinks, statuses=request.status, events=events)
    log.info("deliveries_replayed", events=requeued, sinks=sinks)
    return ReplayAnswer(matched=requeued, requeued=requeued, dry_run=False, sinks=sinks)
