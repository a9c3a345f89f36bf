"""Query strings: one strict parser, and a Struct per endpoint for its parameters.

Parameters are decoded by msgspec like bodies are (``strict=False`` turns ``"50"`` into 50 and
nothing else: no ``"²"``, no ``" 5"``), so a bad value is a 400 naming the parameter, never a
500. Unknown parameters are ignored (clients add cache busters); a known one sent twice is
refused, since which one counts would be a guess.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated, Literal, TypeVar

import msgspec
from aiohttp import web

from gateway.capture.payload import BSUID_SHAPE, MAX_ID
from gateway.errors import InvalidRequest
from gateway.validation import choice_error, pattern_error
from gateway.wire import PRINTABLE

__all__ = [
    "AccountQuery",
    "ConversationsQuery",
    "ErasureQuery",
    "EventFilters",
    "EventsQuery",
    "ListQuery",
    "StatsQuery",
    "convert_query",
    "parse_query",
]

Q = TypeVar("Q", bound="QueryStruct")

_LIST_MAX = 200


def _text(max_length: int) -> msgspec.Meta:
    # No control or invisible characters, as in the API's bodies (wire.PRINTABLE): nothing
    # stored has one, and PostgreSQL's text cannot even be asked about a NUL.
    return msgspec.Meta(min_length=1, max_length=max_length, pattern=PRINTABLE)


PhoneParam = Annotated[str, _text(64)]
# Checked against the shape webhooks are read with: an erasure by a BSUID rewrites archived
# notifications, and must never be asked for a value that cannot be one.
BsuidParam = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID, pattern=BSUID_SHAPE)]


class QueryStruct(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    """Base for query parameters (camelCase like the API's bodies)."""


class AccountQuery(QueryStruct, frozen=True):
    account_id: Annotated[str, _text(128)]


class ListQuery(AccountQuery, frozen=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=_LIST_MAX)] = 50


class ConversationsQuery(ListQuery, frozen=True):
    phone_e164: PhoneParam | None = None
    business_scoped_user_id: BsuidParam | None = None


class ErasureQuery(AccountQuery, frozen=True):
    phone_e164: PhoneParam | None = None
    business_scoped_user_id: BsuidParam | None = None
    conversation_id: Annotated[str, _text(128)] | None = None
    suppress: bool = False


TimeParam = Annotated[str, _text(64)]


class StatsQuery(AccountQuery, frozen=True):
    since: TimeParam | None = None
    until: TimeParam | None = None
    group_by: Literal["day", "ad", "eventName"] = "day"


class EventFilters(QueryStruct, frozen=True):
    """Which events of an account to list (the console's events page takes these too)."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=_LIST_MAX)] = 50
    status: Literal["delivered", "failed", "pending", "expired", "dry_run"] | None = None
    event_name: Annotated[str, _text(128)] | None = None
    since: TimeParam | None = None
    until: TimeParam | None = None
    ad_id: Annotated[str, _text(2048)] | None = None


class EventsQuery(EventFilters, frozen=True, kw_only=True):
    account_id: Annotated[str, _text(128)]


_HINTS = {
    "accountId": "Send `accountId` as an account id from the gateway's config, e.g."
    " ?accountId=demo.",
    "limit": f"Send `limit` as a whole number from 1 to {_LIST_MAX}, e.g. ?limit=50.",
    "phoneE164": "Send `phoneE164` as the number with its country code, e.g. 16505551234.",
    "businessScopedUserId": "Send `businessScopedUserId` as a WhatsApp business-scoped user id"
    " as Meta sends it, e.g. US.13491208655302741918 or US.ENT.11815799212886844830 (a"
    " two-letter country, a dot, then letters and digits).",
    "suppress": "Send `suppress` as true or false.",
    "groupBy": "Send `groupBy` as day, ad or eventName.",
    "status": "Send `status` as delivered, failed, pending, expired or dry_run.",
    "since": "Send `since` as an ISO 8601 date or UTC time, e.g. 2026-11-24T00:00:00Z.",
    "until": "Send `until` as an ISO 8601 date or UTC time, e.g. 2026-11-25T00:00:00Z.",
}
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`")


@cache
def _names(kind: type[QueryStruct]) -> frozenset[str]:
    return frozenset(field.encode_name for field in msgspec.structs.fields(kind))


def parse_query(request: web.Request, kind: type[Q], *, drop_empty: bool = False) -> Q:
    """Return the request's query parameters as ``kind``, or raise 400 naming the parameter.

    ``drop_empty``: an empty value counts as absent (an HTML form's blank fields)."""
    known = _names(kind)
    values: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in known or (drop_empty and not value):
            continue
        if name in values:
            raise InvalidRequest(
                f"`{name}` appears more than once in the query string; send it once.",
                code="invalid_field",
                param=name,
            )
        values[name] = value
    return convert_query(values, kind)


def convert_query(values: dict[str, str], kind: type[Q]) -> Q:
    """Return ``values`` (parameter names to their text) as ``kind``, or raise 400 naming the
    parameter: the query string's rules, for whatever else brings the same parameters (the
    CLI's options)."""
    try:
        return msgspec.convert(values, kind, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        missing = _MISSING.match(text)
        at = _AT.search(text)
        param = missing["name"] if missing else (at["path"] if at else None)
        problem = _AT.sub("", text)
        hint = _HINTS.get(param or "", "")
        if missing:
            raise InvalidRequest(
                f"`{param}` is required as a query parameter. {hint}".strip(),
                code="missing_field",
                param=param,
            ) from None
        if param is not None and values.get(param) == "":
            raise InvalidRequest(
                f"`{param}` is empty; send a value, or leave it out. {hint}".strip(),
                code="invalid_field",
                param=param,
            ) from None
        worded = pattern_error(f"{param}", problem, hint) or choice_error(f"{param}", problem, kind)
        raise worded or InvalidRequest(
            f"Invalid query parameter `{param}`: {problem}. {hint}".strip(),
            code="invalid_field",
            param=param,
        ) from None
