"""Thin handlers for the conversions API: read bytes -> decode -> pipeline -> encode."""

from __future__ import annotations

import time

import msgspec
import structlog
from aiohttp import web

from gateway.erasure import ErasureTarget, erase
from gateway.errors import InvalidRequest, NotFound
from gateway.hashing import normalize_phone
from gateway.http.body import read_json_body
from gateway.http.handlers import (
    account_for,
    authenticate,
    event_detail_or_404,
    json_response,
    query_account_id,
)
from gateway.http.keys import PIPELINE, PLUGINS, SETTINGS
from gateway.http.query import ConversationsQuery, ErasureQuery, EventsQuery, parse_query
from gateway.http.render import (
    answer_status,
    conversation_view,
    conversion_response,
    event_summary,
)
from gateway.http.reporting import events_filter
from gateway.logs import bind
from gateway.validation import decode_conversion
from gateway.wire import ConversationList, ErasureAnswer, EventList, printable

__all__ = ["routes"]

log = structlog.get_logger()
routes = web.RouteTableDef()


def _phone_filter(raw: str | None) -> str | None:
    """Return the ``phoneE164`` filter as digits, or raise 400."""
    if raw is None:
        return None
    digits = normalize_phone(raw)
    if digits is None:
        raise InvalidRequest(
            "Invalid `phoneE164`: expected an international number of 8 to 15 digits with its"
            " country code, e.g. 16505551234.",
            code="invalid_phone",
            param="phoneE164",
        )
    return digits


@routes.post("/v1/whatsapp/conversions")
async def post_conversion(request: web.Request) -> web.Response:
    started = time.time()
    app = request.app
    key = authenticate(request)
    server = app[SETTINGS].server
    body = await read_json_body(request, server.max_body_bytes, timeout_s=server.body_timeout_s)
    conversion = decode_conversion(body)
    bind(event_id=conversion.event_id)
    account = account_for(request, key, conversion.account_id)
    outcome = await app[PIPELINE].handle(conversion, account, started=started)
    bind(event_status=outcome.event.status, duplicate=outcome.duplicate)
    # 202: accepted and stored, not delivered yet (retrying, or the wait ran out).
    return json_response(conversion_response(outcome), status=answer_status(outcome))


@routes.get("/v1/whatsapp/conversions")
async def list_conversions(request: web.Request) -> web.Response:
    key = authenticate(request)
    query = parse_query(request, EventsQuery)
    account = account_for(request, key, query.account_id)
    store = request.app[PIPELINE].store
    where = events_filter(account.id, query, now=time.time())
    events = await store.events_matching(*where.where(), limit=query.limit)
    primary = request.app[PLUGINS].primary_sink
    return json_response(EventList(events=[event_summary(e, primary) for e in events]))


@routes.get("/v1/whatsapp/conversions/{event_id}")
async def get_conversion(request: web.Request) -> web.Response:
    key = authenticate(request)
    account = account_for(request, key, query_account_id(request))
    store = request.app[PIPELINE].store
    detail = await event_detail_or_404(store, account.id, request.match_info["event_id"])
    return json_response(detail)


@routes.get("/v1/whatsapp/conversations")
async def list_conversations(request: web.Request) -> web.Response:
    key = authenticate(request)
    query = parse_query(request, ConversationsQuery)
    account = account_for(request, key, query.account_id)
    conversations = await request.app[PIPELINE].store.recent_conversations(
        account.id,
        wa_id=_phone_filter(query.phone_e164),
        bsuid=query.business_scoped_user_id,
        limit=query.limit,
    )
    return json_response(
        ConversationList(conversations=[conversation_view(c) for c in conversations])
    )


@routes.get("/v1/whatsapp/conversations/{conversation_id}")
async def get_conversation(request: web.Request) -> web.Response:
    key = authenticate(request)
    conversation_id = request.match_info["conversation_id"]
    store = request.app[PIPELINE].store
    # An id no conversation can have (a control character) is not asked of the store at all.
    conversation = (
        await store.find_conversation(conversation_id) if printable(conversation_id) else None
    )
    # Another account's conversation is "not found" to this key: ids reveal nothing.
    if conversation is None or not key.allows(conversation.account_id):
        raise NotFound(
            f"Conversation {conversation_id[:128]!r} not found.",
            code="conversation_not_found",
            param="conversationId",
        )
    bind(account=conversation.account_id)
    return json_response(conversation_view(conversation))


@routes.delete("/v1/whatsapp/users")
async def erase_user(request: web.Request) -> web.Response:
    """Erase one person from an account (a legal request); optionally suppress them."""
    key = authenticate(request)
    query = parse_query(request, ErasureQuery)
    account = account_for(request, key, query.account_id)
    target = ErasureTarget(
        account.id,
        phone=query.phone_e164,
        bsuid=query.business_scoped_user_id,
        conversation_id=query.conversation_id,
    )
    erasure_id, counts, cleared = await erase(
        request.app[PIPELINE].store,
        account,
        target,
        actor=f"api_key:{key.name}",
        suppress=query.suppress,
    )
    # Counts and the audit id only: never who.
    log.info(
        "person_erased", erasure_id=erasure_id, kind=target.kind, **msgspec.to_builtins(counts)
    )
    return json_response(
        ErasureAnswer(
            erasure_id=erasure_id, erased=counts, suppressed=query.suppress, file_cleared=cleared
        )
    )
