"""Thin handlers for the reporting API: stats, health and replay (what the console shows)."""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from gateway.http.handlers import account_for, authenticate, json_response, read_json
from gateway.http.keys import PIPELINE, PLUGINS
from gateway.http.query import AccountQuery, StatsQuery, parse_query
from gateway.http.reporting import health_answer, replay, stats_answer
from gateway.reports import ReplayRequest

__all__ = ["routes"]

routes = web.RouteTableDef()
_REPLAY = msgspec.json.Decoder(ReplayRequest)


@routes.get("/v1/whatsapp/stats")
async def stats(request: web.Request) -> web.Response:
    key = authenticate(request)
    query = parse_query(request, StatsQuery)
    account = account_for(request, key, query.account_id)
    answer = await stats_answer(
        request.app[PIPELINE].store,
        account.id,
        since=query.since,
        until=query.until,
        group_by=query.group_by,
        now=time.time(),
    )
    return json_response(answer)


@routes.get("/v1/whatsapp/health")
async def health(request: web.Request) -> web.Response:
    key = authenticate(request)
    account = account_for(request, key, parse_query(request, AccountQuery).account_id)
    answer = await health_answer(
        request.app[PIPELINE],
        request.app[PLUGINS],
        account,
        every_account="*" in key.accounts,
        now=time.time(),
    )
    return json_response(answer)


@routes.post("/v1/whatsapp/replay")
async def replay_events(request: web.Request) -> web.Response:
    key = authenticate(request)
    body = await read_json(request, _REPLAY)
    account_for(request, key, body.account_id)  # 403/404 before anything is counted
    answer = await replay(request.app[PIPELINE].store, request.app[PLUGINS], body, now=time.time())
    return json_response(answer)
