"""Thin handlers for the conversions API: read bytes -> decode -> pipeline -> encode."""

from __future__ import annotations

import time

import msgspec
import structlog
from aiohttp import web

from gateway.auth import ApiKey, KeyRing
from gateway.config import AccountConfig
from gateway.context import KEYS, PIPELINE
from gateway.errors import InvalidRequest, UnsupportedMediaType
from gateway.models import ENCODER, EventList
from gateway.render import conversion_response, event_summary
from gateway.validation import decode_conversion

__all__ = ["json_response", "routes"]

routes = web.RouteTableDef()

_LIST_DEFAULT = 50
_LIST_MAX = 200


def json_response(value: msgspec.Struct, *, status: int = 200) -> web.Response:
    """Encode a wire Struct as the response body."""
    return web.Response(body=ENCODER.encode(value), status=status, content_type="application/json")


def authenticate(request: web.Request) -> ApiKey:
    """Return the caller's API key or raise 401."""
    return request.app[KEYS].authenticate(request.headers.get("Authorization"))


def account_for(request: web.Request, key: ApiKey, account_id: str) -> AccountConfig:
    """Return the account ``key`` may act for, or raise 403/404."""
    structlog.contextvars.bind_contextvars(account=account_id)
    KeyRing.authorize(key, account_id)
    return request.app[PIPELINE].account(account_id)


async def read_json_body(request: web.Request) -> bytes:
    """Return the raw body of a JSON request, or raise 415 (not JSON) / 413 (too large)."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {request.content_type or 'none'!r};"
            " send `-H 'Content-Type: application/json'`.",
            param="Content-Type",
        )
    return await request.read()


def query_account_id(request: web.Request) -> str:
    """Return the required ``accountId`` query parameter, or raise 400."""
    account_id = request.query.get("accountId", "")
    if not account_id:
        raise InvalidRequest(
            "`accountId` is required as a query parameter, e.g. ?accountId=demo.",
            code="missing_field",
            param="accountId",
        )
    return account_id


def query_limit(request: web.Request) -> int:
    """Return ``limit`` (1-200, default 50), or raise 400."""
    raw = request.query.get("limit")
    if raw is None:
        return _LIST_DEFAULT
    if not raw.isdigit() or not 1 <= int(raw) <= _LIST_MAX:
        raise InvalidRequest(
            f"Invalid `limit` {raw[:32]!r}: send a whole number from 1 to {_LIST_MAX}.",
            code="invalid_field",
            param="limit",
        )
    return int(raw)


@routes.post("/v1/whatsapp/conversions")
async def post_conversion(request: web.Request) -> web.Response:
    started = time.time()
    key = authenticate(request)
    body = await read_json_body(request)
    conversion = decode_conversion(body)
    structlog.contextvars.bind_contextvars(event_id=conversion.event_id)
    account = account_for(request, key, conversion.account_id)
    outcome = await request.app[PIPELINE].handle(conversion, account, started=started)
    structlog.contextvars.bind_contextvars(
        event_status=outcome.event.status, duplicate=outcome.duplicate
    )
    return json_response(conversion_response(outcome))


@routes.get("/v1/whatsapp/conversions")
async def list_conversions(request: web.Request) -> web.Response:
    key = authenticate(request)
    account = account_for(request, key, query_account_id(request))
    events = await request.app[PIPELINE].store.recent_events(account.id, query_limit(request))
    return json_response(EventList(events=[event_summary(e) for e in events]))
