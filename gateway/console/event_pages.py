"""The console's event pages: events (filtered), one event, replay, and conversations."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated

import aiohttp_jinja2
import msgspec
from aiohttp import web

from gateway.console.forms import form_of
from gateway.console.guard import CONSOLE, Viewer, check_csrf, page, redirect, segment
from gateway.console.pages import context
from gateway.errors import InvalidRequest
from gateway.hashing import normalize_phone
from gateway.http.handlers import event_detail_or_404
from gateway.http.keys import PIPELINE, PLUGINS, SETTINGS
from gateway.http.query import EventFilters, QueryStruct, parse_query
from gateway.http.render import conversation_view, event_summary, iso_time
from gateway.http.reporting import events_filter, replay
from gateway.reports import ReplayRequest
from gateway.store.reports import EventFilter
from gateway.validation import validation_error

__all__ = ["routes"]

routes = web.RouteTableDef()
_REPLAY_FIELDS = ("status", "eventName", "since", "until", "adId", "eventIds")
# One value each per field; these repeat (one field per status, one per event id: an id may
# hold a comma).
_REPEATED = ("status", "eventIds")
# What a replay just did, for the page to say (the redirect after it carries it).
Replayed = Annotated[int, msgspec.Meta(ge=0)]


class EventsPageQuery(EventFilters, frozen=True):
    replayed: Replayed | None = None


class EventPageQuery(QueryStruct, frozen=True):
    replayed: Replayed | None = None


class FindQuery(QueryStruct, frozen=True):
    q: Annotated[str, msgspec.Meta(max_length=256)] = ""


@routes.get("/console/accounts/{account_id}/events")
@page
async def events(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """The account's events, newest first, filtered by status, name, period and ad."""
    account = viewer.account(request)
    query = parse_query(request, EventsPageQuery, drop_empty=True)
    found = await request.app[PIPELINE].store.events_matching(
        *events_filter(account.id, query, now=time.time()).where(), limit=query.limit
    )
    primary = request.app[PLUGINS].primary_sink
    return aiohttp_jinja2.render_template(
        "events.html",
        request,
        context(
            request,
            viewer,
            account,
            "events",
            filters=query,
            events=[msgspec.to_builtins(event_summary(e, primary)) for e in found],
            event_names=request.app[SETTINGS].events.allowed_names,
            replayable=bool(request.app[PLUGINS].outbox_sinks),
        ),
    )


@routes.get("/console/accounts/{account_id}/events/{event_id}")
@page
async def event(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """One event: each sink's state, every attempt and the exact (hashed) payload."""
    account = viewer.account(request)
    query = parse_query(request, EventPageQuery, drop_empty=True)
    store = request.app[PIPELINE].store
    detail = await event_detail_or_404(store, account.id, request.match_info["event_id"])
    outbox = set(request.app[PLUGINS].outbox_sinks)
    return aiohttp_jinja2.render_template(
        "event.html",
        request,
        context(
            request,
            viewer,
            account,
            "events",
            event=msgspec.to_builtins(detail),
            payload=json.dumps(detail.event, indent=2, sort_keys=True),
            replayable=any(
                d.status in ("failed", "expired") and d.sink in outbox for d in detail.deliveries
            ),
            replayed=query.replayed,
        ),
    )


def _replay_request(account_id: str, values: Callable[[str], list[str]]) -> ReplayRequest:
    """The replay a form (or the confirmation link) names, decoded like the API's body:
    ``values(name)`` gives a field's values, in order."""
    body: dict[str, object] = {"accountId": account_id}
    for name in _REPLAY_FIELDS:
        given = [v.strip() for v in values(name) if v.strip()]
        if name in _REPEATED and given:
            body[name] = given
        elif len(given) > 1:
            raise InvalidRequest(
                f"`{name}` appears more than once; send it once.",
                code="invalid_field",
                param=name,
            )
        elif given:
            body[name] = given[0]
    body.setdefault("status", ["failed", "expired"])
    try:
        return msgspec.convert(body, ReplayRequest)
    except msgspec.ValidationError as exc:
        error = validation_error(exc, _REPLAY_FIELDS, ReplayRequest)
        # The form's field, not the item in it (`eventIds[0]`): that is what the page names.
        field = (error.param or "").partition("[")[0] or None
        raise InvalidRequest(error.message, code=error.code, param=field) from None


@routes.get("/console/accounts/{account_id}/replay")
@page
async def confirm_replay(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """Say how many events a replay would re-queue, and ask to confirm it."""
    account = viewer.account(request)
    wanted = _replay_request(account.id, lambda name: request.query.getall(name, []))
    dry = msgspec.structs.replace(wanted, dry_run=True)
    answer = await replay(request.app[PIPELINE].store, request.app[PLUGINS], dry, now=time.time())
    hidden = [(name, value) for name in _REPLAY_FIELDS for value in request.query.getall(name, [])]
    return aiohttp_jinja2.render_template(
        "replay.html",
        request,
        context(request, viewer, account, "events", answer=answer, hidden=hidden, wanted=wanted),
    )


@routes.post("/console/accounts/{account_id}/replay")
@page
async def do_replay(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """Re-queue the matching failed or expired deliveries; back to where it was asked."""
    form = await form_of(request)
    check_csrf(request, viewer, form)
    account = viewer.account(request)
    wanted = _replay_request(account.id, form.all)
    answer = await replay(
        request.app[PIPELINE].store, request.app[PLUGINS], wanted, now=time.time()
    )
    base = f"{request.app[CONSOLE].path}/accounts/{segment(account.id)}"
    if wanted.event_ids is not None and len(wanted.event_ids) == 1:
        return redirect(f"{base}/events/{segment(wanted.event_ids[0])}?replayed={answer.requeued}")
    return redirect(f"{base}/events?replayed={answer.requeued}")


def _find(q: str) -> dict[str, str]:
    """Tell what the search box holds: a conversation id, a phone, or a BSUID."""
    text = q.strip()
    if not text:
        return {}
    if text.startswith("conv_"):
        return {"conversation_id": text}
    if text[:1] in "+0123456789(":
        digits = normalize_phone(text)
        if digits is None:
            raise InvalidRequest(
                "That is not a phone number: send it with its country code, e.g."
                " +1 650 555 1234 (or search by BSUID or conversation id).",
                code="invalid_phone",
                param="q",
            )
        return {"wa_id": digits}
    return {"bsuid": text}


@routes.get("/console/accounts/{account_id}/conversations")
@page
async def conversations(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """Find conversations by phone, BSUID or id; each with its click and conversions."""
    account = viewer.account(request)
    query = parse_query(request, FindQuery, drop_empty=True)
    store = request.app[PIPELINE].store
    wanted = _find(query.q)
    if "conversation_id" in wanted:
        one = await store.get_conversation(account.id, wanted["conversation_id"])
        found = [one] if one is not None else []
    else:
        found = await store.recent_conversations(
            account.id, wa_id=wanted.get("wa_id"), bsuid=wanted.get("bsuid"), limit=20
        )
    primary = request.app[PLUGINS].primary_sink
    shown = []
    for conversation in found:
        where = EventFilter(account_id=account.id, conversation_id=conversation.id).where()
        converted = await store.events_matching(*where, limit=50)
        shown.append(
            {
                "conversation": msgspec.to_builtins(conversation_view(conversation)),
                "events": [msgspec.to_builtins(event_summary(e, primary)) for e in converted],
            }
        )
    return aiohttp_jinja2.render_template(
        "conversations.html",
        request,
        context(
            request,
            viewer,
            account,
            "conversations",
            q=query.q,
            searched=bool(wanted),
            found=shown,
            now=iso_time(time.time()),
        ),
    )
