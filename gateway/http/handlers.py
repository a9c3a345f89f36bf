"""The building blocks of a thin handler: who is calling, for which account, with what body,
and the answer. The API's views use them, and so do plugins' routes (``gateway_register_routes``)
through :mod:`gateway`, so every endpoint authenticates, limits and answers errors alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import msgspec
from aiohttp import web

from gateway.config import AccountConfig
from gateway.errors import NotFound
from gateway.http.auth import ApiKey, KeyRing
from gateway.http.body import read_json_body
from gateway.http.keys import CREDENTIALS, PIPELINE, SETTINGS
from gateway.http.query import AccountQuery, parse_query
from gateway.http.render import event_detail
from gateway.logs import bind, logged_id
from gateway.validation import decode_body
from gateway.wire import ENCODER, EventDetail, printable

if TYPE_CHECKING:
    from gateway.store.database import Store

__all__ = [
    "account_for",
    "authenticate",
    "authorized_account",
    "event_detail_or_404",
    "json_response",
    "query_account_id",
    "read_json",
]

T = TypeVar("T")


def json_response(value: msgspec.Struct, *, status: int = 200) -> web.Response:
    """Encode a wire Struct as the response body."""
    return web.Response(body=ENCODER.encode(value), status=status, content_type="application/json")


def authenticate(request: web.Request) -> ApiKey:
    """Return the caller's API key or raise 401."""
    return request.app[CREDENTIALS].keys.authenticate(request.headers.get("Authorization"))


def account_for(request: web.Request, key: ApiKey, account_id: str) -> AccountConfig:
    """Return the account ``key`` may act for, or raise 403/404."""
    pipeline = request.app[PIPELINE]
    account = pipeline.settings.account(account_id)
    # A configured id is logged as it is; any other is the client's text, masked like it.
    bind(account=account_id if account is not None else logged_id(account_id[:128]))
    KeyRing.authorize(key, account_id)
    return account if account is not None else pipeline.account(account_id)  # 404


def authorized_account(request: web.Request, account_id: str) -> AccountConfig:
    """Return the account the caller's API key may act for, or raise 401/403/404."""
    return account_for(request, authenticate(request), account_id)


def query_account_id(request: web.Request) -> str:
    """Return the required ``accountId`` query parameter, or raise 400."""
    return parse_query(request, AccountQuery).account_id


async def read_json(request: web.Request, decoder: msgspec.json.Decoder[T]) -> T:
    """Read a JSON body (415 if not JSON, 413 past ``[server] max_body_bytes``) and decode it
    with ``decoder`` (400 naming the field)."""
    server = request.app[SETTINGS].server
    body = await read_json_body(request, server.max_body_bytes, timeout_s=server.body_timeout_s)
    return decode_body(body, decoder)


async def event_detail_or_404(store: Store, account_id: str, event_id: str) -> EventDetail:
    """Return an event of the account with every attempt at delivering it, or raise 404."""
    # An id no event can have (a control character) is not asked of the store at all.
    event = await store.find_event(account_id, event_id) if printable(event_id) else None
    if event is None:
        raise NotFound(
            f"No event {event_id[:256]!r} on account {account_id!r}.",
            code="event_not_found",
            param="eventId",
        )
    return event_detail(event, await store.outbox.attempts(event.pk))
