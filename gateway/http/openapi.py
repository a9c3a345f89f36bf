"""The OpenAPI 3.1 document, generated from the wire Structs (never written by hand).

Schemas come from :func:`msgspec.json.schema_components` over the same Structs the handlers
decode and encode, so the document cannot drift from the code. Each operation lists its
parameters, body, answers and errors; :func:`build_openapi` includes exactly the routes the
app serves (plugin routes too), and a route without documentation is a test failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from gateway.capture.payload import Envelope
from gateway.reports import HealthAnswer, ReplayAnswer, ReplayRequest, StatsAnswer
from gateway.store.capture import CaptureResult
from gateway.wire import (
    ConversationList,
    ConversationView,
    ConversionRequest,
    ConversionResponse,
    DatasetAnswer,
    DatasetRequest,
    ErasureAnswer,
    ErrorBody,
    EventDetail,
    EventList,
    Health,
    PlatformErrorBody,
)

__all__ = ["EXAMPLES", "OPERATIONS", "Operation", "build_openapi"]

_REF = "#/components/schemas/{name}"

# Documented examples; the test suite decodes each with its Struct.
EXAMPLES: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "purchase": (
        ConversionRequest,
        {
            "accountId": "demo",
            "eventName": "Purchase",
            "eventId": "order-991",
            "phoneE164": "16505551234",
            "value": 49.99,
            "currency": "USD",
            "contentIds": ["sku-1"],
            "email": "john_smith@gmail.com",
        },
    ),
    "lead": (
        ConversionRequest,
        {
            "accountId": "demo",
            "eventName": "LeadSubmitted",
            "eventId": "lead-17",
            "conversationId": "conv_5f0c1a2b3c4d5e6f7a8b9c0d",
        },
    ),
    "dataset": (DatasetRequest, {"accountId": "demo"}),
    "replay": (
        ReplayRequest,
        {"accountId": "demo", "status": ["failed"], "since": "2026-11-24", "dryRun": True},
    ),
}


@dataclass(frozen=True)
class Operation:
    summary: str
    request: type[Any] | None = None
    example: str | None = None
    answers: dict[int, type[Any] | str] = field(default_factory=dict)
    query: tuple[tuple[str, bool, str], ...] = ()
    path_params: tuple[str, ...] = ()
    headers: tuple[tuple[str, bool, str], ...] = ()
    auth: bool = True


_CLIENT_ERRORS: dict[int, type[Any] | str] = {
    400: ErrorBody,
    401: ErrorBody,
    403: ErrorBody,
    404: ErrorBody,
    429: ErrorBody,
}
_ACCOUNT = ("accountId", True, "An account id from [[accounts]].")
_LIMIT = ("limit", False, "1-200, default 50.")
_SINCE = ("since", False, "ISO 8601 date or time with a zone, e.g. 2026-11-24T00:00:00Z.")
_UNTIL = ("until", False, "ISO 8601, exclusive (default: now).")
_PAGE: dict[int, type[Any] | str] = {
    200: "text/html",
    303: "text/html",
    400: ErrorBody,
    403: ErrorBody,
    404: ErrorBody,
}
_ACCOUNT_PATH = ("account_id",)

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/v1/whatsapp/conversions"): Operation(
        "Report a conversion (Zernio's SendWhatsAppConversionRequest).",
        request=ConversionRequest,
        example="purchase",
        answers={
            200: ConversionResponse,
            202: ConversionResponse,
            **_CLIENT_ERRORS,
            408: ErrorBody,
            409: ErrorBody,
            413: ErrorBody,
            415: ErrorBody,
            422: ErrorBody,
            503: ErrorBody,
        },
    ),
    ("GET", "/v1/whatsapp/conversions"): Operation(
        "The account's most recent events, newest first, optionally filtered.",
        answers={200: EventList, **_CLIENT_ERRORS},
        query=(
            _ACCOUNT,
            _LIMIT,
            ("status", False, "delivered, failed, pending, expired or dry_run."),
            ("eventName", False, "One event name."),
            _SINCE,
            _UNTIL,
            ("adId", False, "The ad (referral source_id) of the event's conversation."),
        ),
    ),
    ("GET", "/v1/whatsapp/stats"): Operation(
        "An account's clicks, conversations, conversions by status and value for a period,"
        " per UTC day, per ad (funnel) or per event name.",
        answers={200: StatsAnswer, **_CLIENT_ERRORS},
        query=(
            _ACCOUNT,
            _SINCE,
            _UNTIL,
            ("groupBy", False, "day (default), ad or eventName."),
        ),
    ),
    ("GET", "/v1/whatsapp/health"): Operation(
        "Outbox depth, the last delivery error per sink, webhook backlog and store size.",
        answers={200: HealthAnswer, **_CLIENT_ERRORS},
        query=(_ACCOUNT,),
    ),
    ("POST", "/v1/whatsapp/replay"): Operation(
        "Re-queue (or count, with dryRun) an account's failed or expired deliveries.",
        request=ReplayRequest,
        example="replay",
        answers={
            200: ReplayAnswer,
            **_CLIENT_ERRORS,
            408: ErrorBody,
            413: ErrorBody,
            415: ErrorBody,
        },
    ),
    ("GET", "/v1/whatsapp/conversions/{event_id}"): Operation(
        "One event with each sink's state and every attempt.",
        answers={200: EventDetail, **_CLIENT_ERRORS},
        query=(_ACCOUNT,),
        path_params=("event_id",),
    ),
    ("GET", "/v1/whatsapp/conversations"): Operation(
        "Conversations, newest first, optionally for one phone and/or BSUID.",
        answers={200: ConversationList, **_CLIENT_ERRORS},
        query=(
            _ACCOUNT,
            ("phoneE164", False, "Digits with country code (current or former number)."),
            (
                "businessScopedUserId",
                False,
                "A business-scoped user id (current, former or parent), e.g. US.1349120865.",
            ),
            _LIMIT,
        ),
    ),
    ("GET", "/v1/whatsapp/conversations/{conversation_id}"): Operation(
        "One conversation; its id is what conversationId takes.",
        answers={200: ConversationView, **_CLIENT_ERRORS},
        path_params=("conversation_id",),
    ),
    ("DELETE", "/v1/whatsapp/users"): Operation(
        "Erase one person from an account (a legal request); optionally suppress them.",
        answers={200: ErasureAnswer, **_CLIENT_ERRORS, 422: ErrorBody},
        query=(
            _ACCOUNT,
            ("phoneE164", False, "The person's phone, with its country code."),
            ("businessScopedUserId", False, "Or their business-scoped user id."),
            ("conversationId", False, "Or one of their conversation ids."),
            ("suppress", False, "true: refuse their future messages and conversions."),
        ),
    ),
    ("GET", "/v1/whatsapp/dataset"): Operation(
        "The account's dataset id (meta_capi sink).",
        answers={200: DatasetAnswer, **_CLIENT_ERRORS},
        query=(_ACCOUNT,),
    ),
    ("POST", "/v1/whatsapp/dataset"): Operation(
        "Create or fetch the WABA's dataset at Meta (meta_capi sink).",
        request=DatasetRequest,
        example="dataset",
        answers={200: DatasetAnswer, **_CLIENT_ERRORS, 415: ErrorBody, 502: PlatformErrorBody},
    ),
    ("GET", "/webhooks/whatsapp"): Operation(
        "Meta's verification handshake: echoes hub.challenge.",
        answers={200: "text/plain", 403: ErrorBody},
        query=(
            ("hub.mode", True, "subscribe"),
            ("hub.verify_token", True, "The token from [webhook] verify_token_env."),
            ("hub.challenge", True, "Echoed back."),
        ),
        auth=False,
    ),
    ("POST", "/webhooks/whatsapp"): Operation(
        "WhatsApp Cloud API notifications, signed with the app secret.",
        request=Envelope,
        answers={
            200: CaptureResult,
            401: ErrorBody,
            408: ErrorBody,
            413: ErrorBody,
            503: ErrorBody,
        },
        headers=(("X-Hub-Signature-256", True, "sha256=<hex HMAC-SHA256 of the body>"),),
        auth=False,
    ),
    ("GET", "/metrics"): Operation(
        "Prometheus metrics (bearer key if [metrics] key_env is set).",
        answers={200: "text/plain", 401: ErrorBody},
    ),
    ("GET", "/healthz"): Operation("The process is alive.", answers={200: Health}, auth=False),
    ("GET", "/readyz"): Operation(
        "The store takes writes and every plugin (dispatchers) runs.",
        answers={200: Health, 503: ErrorBody},
        auth=False,
    ),
    ("GET", "/openapi.json"): Operation(
        "This document.", answers={200: "application/json"}, auth=False
    ),
    # The console: HTML pages for a browser signed in with a session cookie (not an API).
    ("GET", "/console"): Operation("Console: the first account's overview.", answers=_PAGE),
    ("GET", "/console/"): Operation("Console: the first account's overview.", answers=_PAGE),
    ("GET", "/console/sign-in"): Operation(
        "Console: the sign-in form.", answers={200: "text/html"}, auth=False
    ),
    ("POST", "/console/sign-in"): Operation(
        "Console: sign in with an API key (form field `key`); sets the session cookie.",
        answers={303: "text/html", 400: ErrorBody, 401: ErrorBody, 403: ErrorBody},
        auth=False,
    ),
    ("POST", "/console/sign-out"): Operation(
        "Console: end the session (form field `csrf`).",
        answers={303: "text/html", 401: ErrorBody, 403: ErrorBody},
        auth=False,
    ),
    ("GET", "/console/static/{name}"): Operation(
        "Console: scripts, styles and licences.",
        answers={200: "text/plain", 404: ErrorBody},
        path_params=("name",),
        auth=False,
    ),
    **{
        ("GET", f"/console/accounts/{{account_id}}/{page}"): Operation(
            f"Console: the {title} page.", answers=_PAGE, path_params=_ACCOUNT_PATH, auth=False
        )
        for page, title in (
            ("overview", "overview"),
            ("ads", "ads funnel"),
            ("ads.csv", "ads funnel CSV"),
            ("events", "events"),
            ("replay", "replay confirmation"),
            ("conversations", "conversations"),
            ("health", "health"),
        )
    },
    ("GET", "/console/accounts/{account_id}/events/{event_id}"): Operation(
        "Console: one event.", answers=_PAGE, path_params=(*_ACCOUNT_PATH, "event_id"), auth=False
    ),
    ("POST", "/console/accounts/{account_id}/replay"): Operation(
        "Console: re-queue the matching failed or expired deliveries (form field `csrf`).",
        answers={303: "text/html", 400: ErrorBody, 401: ErrorBody, 403: ErrorBody},
        path_params=_ACCOUNT_PATH,
        auth=False,
    ),
}


def _served(app: web.Application) -> list[tuple[str, str]]:
    served: list[tuple[str, str]] = []
    for route in app.router.routes():
        resource = route.resource
        if route.method == "HEAD" or resource is None:
            continue
        served.append((route.method, resource.canonical))
    return served


def build_openapi(app: web.Application, *, title: str, version: str) -> dict[str, Any]:
    """Return the OpenAPI 3.1 document for the routes ``app`` serves."""
    served = _served(app)
    types: list[type[Any]] = []
    for key in served:
        op = OPERATIONS.get(key)
        if op is None:
            continue
        if op.request is not None:
            types.append(op.request)
        types.extend(t for t in op.answers.values() if isinstance(t, type))
    unique = list(dict.fromkeys(types))
    refs, components = msgspec.json.schema_components(unique, ref_template=_REF)
    ref_of = dict(zip(unique, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for method, path in served:
        op = OPERATIONS.get((method, path))
        doc = _operation(op, ref_of) if op else {"summary": "Undocumented route."}
        paths.setdefault(path, {})[method.lower()] = doc
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(op: Operation, ref_of: dict[type[Any], dict[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {"summary": op.summary, "responses": {}}
    params = [
        {"name": n, "in": "query", "required": req, "description": d, "schema": {"type": "string"}}
        for n, req, d in op.query
    ]
    params += [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for n in op.path_params
    ]
    params += [
        {"name": n, "in": "header", "required": req, "description": d, "schema": {"type": "string"}}
        for n, req, d in op.headers
    ]
    if params:
        doc["parameters"] = params
    if op.request is not None:
        media: dict[str, Any] = {"schema": ref_of[op.request]}
        if op.example:
            media["example"] = EXAMPLES[op.example][1]
        doc["requestBody"] = {"required": True, "content": {"application/json": media}}
    for status, answer in sorted(op.answers.items()):
        if isinstance(answer, str):
            content = {answer: {"schema": {"type": "string" if "text" in answer else "object"}}}
        else:
            content = {"application/json": {"schema": ref_of[answer]}}
        doc["responses"][str(status)] = {"description": str(status), "content": content}
    doc["security"] = [{"apiKey": []}] if op.auth else []
    return doc
