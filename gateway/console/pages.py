"""The console's reporting pages: overview, ads funnel (and its CSV), health.

Each page asks :mod:`gateway.http.reporting` for the very answer the JSON API gives and
renders it; the chart reads the same answer from a JSON data block.
"""

from __future__ import annotations

import csv
import io
import time
from typing import Any, Literal

import aiohttp_jinja2
import msgspec
from aiohttp import web

from gateway.config import AccountConfig
from gateway.console.guard import CONSOLE, Viewer, page
from gateway.console.periods import PERIODS, PeriodQuery, since_until
from gateway.http.keys import PIPELINE, PLUGINS
from gateway.http.query import parse_query
from gateway.http.reporting import health_answer, stats_answer
from gateway.reports import AdRow, StatsAnswer

__all__ = ["context", "routes"]

routes = web.RouteTableDef()

_SORTS = {
    "ad": lambda r: (r.headline or r.ad_id or "").lower(),
    "clicks": lambda r: r.clicks,
    "conversations": lambda r: r.conversations,
    "conversions": lambda r: r.events,
    "rate": lambda r: r.conversion_rate or 0.0,
    "time": lambda r: r.median_click_to_conversion_s or 0.0,
    "value": lambda r: sum(m.value for m in r.value),
}


class AdsQuery(PeriodQuery, frozen=True):
    sort: Literal["ad", "clicks", "conversations", "conversions", "rate", "time", "value"] = (
        "conversions"
    )
    dir: Literal["asc", "desc"] = "desc"


def context(
    request: web.Request, viewer: Viewer, account: AccountConfig | None, nav: str, **extra: Any
) -> dict[str, Any]:
    """What every page's template gets: who is signed in, where, and the CSRF token."""
    return {
        "base": request.app[CONSOLE].path,
        "viewer_key": viewer.key.name,
        "accounts": [a.id for a in viewer.accounts],
        "account": account.id if account else None,
        "csrf": viewer.session.csrf_token,
        "nav": nav,
        "query": dict(request.query),
        **extra,
    }


async def _stats(
    request: web.Request, account: AccountConfig, query: PeriodQuery, group_by: str
) -> StatsAnswer:
    since, until = since_until(query, now=time.time())
    return await stats_answer(
        request.app[PIPELINE].store,
        account.id,
        since=since,
        until=until,
        group_by="ad" if group_by == "ad" else "day",
        now=time.time(),
    )


def _chart_data(answer: StatsAnswer) -> dict[str, Any]:
    days = answer.days or []
    return {
        "days": [d.day for d in days],
        "clicks": [d.clicks for d in days],
        "conversations": [d.conversations for d in days],
        "statuses": {
            status: [getattr(d.conversions, status) for d in days]
            for status in ("delivered", "failed", "pending", "expired", "dry_run")
        },
    }


@routes.get("/console/accounts/{account_id}/overview")
@page
async def overview(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """Clicks, conversations, conversions by status, value and the chart, for a period."""
    account = viewer.account(request)
    query = parse_query(request, PeriodQuery, drop_empty=True)
    answer = await _stats(request, account, query, "day")
    return aiohttp_jinja2.render_template(
        "overview.html",
        request,
        context(
            request,
            viewer,
            account,
            "overview",
            period=query,
            periods=list(PERIODS),
            answer=answer,
            chart=_chart_data(answer),
        ),
    )


async def _funnel(
    request: web.Request, account: AccountConfig
) -> tuple[AdsQuery, StatsAnswer, list[AdRow], list[str]]:
    """The page's query, the funnel's answer, its rows in the page's order and the event
    names any row has (the ads page and its CSV show the same)."""
    query = parse_query(request, AdsQuery, drop_empty=True)
    answer = await _stats(request, account, query, "ad")
    rows = sorted(answer.ads or [], key=_SORTS[query.sort], reverse=query.dir == "desc")
    return query, answer, rows, sorted({name for row in rows for name in row.by_event_name})


@routes.get("/console/accounts/{account_id}/ads")
@page
async def ads(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """One row per ad: clicks, conversations, conversions, value, rate, time to convert."""
    account = viewer.account(request)
    query, answer, rows, names = await _funnel(request, account)
    return aiohttp_jinja2.render_template(
        "ads.html",
        request,
        context(
            request,
            viewer,
            account,
            "ads",
            period=query,
            periods=list(PERIODS),
            answer=answer,
            rows=rows,
            event_names=names,
            sort=query.sort,
            dir=query.dir,
        ),
    )


def _cell(value: object) -> object:
    # A spreadsheet runs a cell that starts with =, +, - or @ as a formula: ad headlines
    # are written by whoever made the ad.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


@routes.get("/console/accounts/{account_id}/ads.csv")
@page
async def ads_csv(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """The ads funnel as CSV (the page's period and order)."""
    account = viewer.account(request)
    _, answer, rows, names = await _funnel(request, account)
    currencies = sorted({m.currency for row in rows for m in row.value})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "ad_id", "headline", "source_url", "clicks", "conversations", "converted",
            "conversion_rate", "conversions", "delivered", "failed", "pending", "expired",
            "dry_run", *(f"events_{n}" for n in names), *(f"value_{c}" for c in currencies),
            "median_click_to_conversion_s",
        ]
    )  # fmt: skip
    for row in rows:
        values = {m.currency: m.value for m in row.value}
        c = row.conversions
        writer.writerow(
            [
                _cell(v)
                for v in (
                    row.ad_id or "", row.headline or "", row.source_url or "", row.clicks,
                    row.conversations, row.converted, row.conversion_rate or 0, row.events,
                    c.delivered, c.failed, c.pending, c.expired, c.dry_run,
                    *(row.by_event_name.get(n, 0) for n in names),
                    *(values.get(cur, 0) for cur in currencies),
                    "" if row.median_click_to_conversion_s is None
                    else row.median_click_to_conversion_s,
                )
            ]
        )  # fmt: skip
    filename = f"ads-{account.id}-{answer.since[:10]}-{answer.until[:10]}.csv"
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in filename)
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{safe}"'},
    )


@routes.get("/console/accounts/{account_id}/health")
@page
async def health(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """Outbox depth, the last delivery error, webhook backlog and the store's size."""
    account = viewer.account(request)
    answer = await health_answer(
        request.app[PIPELINE],
        request.app[PLUGINS],
        account,
        every_account="*" in viewer.key.accounts,
        now=time.time(),
    )
    return aiohttp_jinja2.render_template(
        "health.html",
        request,
        context(request, viewer, account, "health", answer=msgspec.to_builtins(answer)),
    )
