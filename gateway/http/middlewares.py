"""Request id, one canonical log line per request, and every error as a JSON envelope.

No client input reaches the client as a traceback: anything unexpected becomes a 500 envelope
quoting the request id, and the traceback goes to the log (without frame locals).
"""

from __future__ import annotations

import itertools
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    PlatformError,
    RateLimited,
    ServiceUnavailable,
)
from gateway.http.auth import FailureLimiter, IPNetwork, client_address
from gateway.http.body import too_large
from gateway.logs import bind, log_request, logged_id, logged_param, start_request_log
from gateway.metrics import Metrics
from gateway.store.engines import store_unavailable
from gateway.wire import ENCODER, ErrorBody, PlatformErrorBody

__all__ = ["REQUEST_ID_HEADER", "Section", "error_response", "middlewares"]

REQUEST_ID_HEADER = "X-Request-Id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{8,128}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A path prefix and what to add to every answer under it, whoever made the answer (the
# console's security headers: its pages, and the 404s, 405s and 429s made out here).
Section = tuple[str, Callable[[web.StreamResponse], None]]
log = structlog.get_logger()


def error_response(exc: GatewayError, *, headers: dict[str, str] | None = None) -> web.Response:
    """Render ``exc`` as Zernio's error envelope."""
    body = error_body(exc)
    response = web.Response(
        body=ENCODER.encode(body),
        status=exc.status,
        content_type="application/json",
        headers=headers,
    )
    if exc.status == 408:
        # A client whose body did not arrive in time gets no second request on this
        # connection (RFC 9110 15.5.9: a 408 closes it).
        response.force_close()
    return response


def error_body(exc: GatewayError) -> ErrorBody:
    """Return the envelope for ``exc`` (with Meta's error for upstream failures)."""
    if isinstance(exc, PlatformError):
        return PlatformErrorBody(
            error=exc.message,
            type=exc.type,
            code=exc.code,
            param=exc.param,
            details=exc.details,
            platform=exc.platform,
            platform_error=exc.platform_error,
        )
    return ErrorBody(
        error=exc.message, type=exc.type, code=exc.code, param=exc.param, details=exc.details
    )


def make_middleware(
    max_body_bytes: int,
    metrics: Metrics,
    failures: FailureLimiter,
    trusted_proxies: Sequence[IPNetwork],
    section: Section | None = None,
) -> Middleware:
    """Return the middleware: request id, errors as envelopes, failed-authentication limits,
    ``section``'s headers, and the canonical log line."""
    # A random per-app prefix and a counter: unique like uuid4, without a getrandom() syscall
    # on every request.
    prefix = secrets.token_hex(8)
    counter = itertools.count(1)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        supplied = request.headers.get(REQUEST_ID_HEADER, "")
        # Adopted unless the log would have to mask it (a phone number's shape): an id an
        # operator cannot search for is no use, so that request gets one of ours.
        if _VALID_REQUEST_ID.match(supplied) and logged_id(supplied) == supplied:
            request_id = supplied
        else:
            request_id = f"{prefix}{next(counter):016x}"
        start_request_log(request_id=request_id)
        started = time.perf_counter()
        try:
            response = await handler(request)
        except Exception as exc:
            response = _answer_failure(exc, request, max_body_bytes)
        if response.status in _FAILED_AUTHENTICATION:
            client = client_address(
                request.remote, request.headers.get("X-Forwarded-For"), trusted_proxies
            )
            wait, newly = failures.failed(client)
            if newly:
                metrics.auth_failures_limited.inc()
                # The address, once per episode: what an operator would block.
                log.warning("auth_failures_limited", client=client)
            if wait is not None:
                response = _too_many_failures(wait)
        # One cached attribute and a prefix test: nothing measurable on the other routes.
        if section is not None and request.path.startswith(section[0]):
            section[1](response)
        response.headers[REQUEST_ID_HEADER] = request_id
        elapsed = time.perf_counter() - started
        # Unmatched paths share one label: a scanner must not mint a time series per URL.
        route = _route(request) or "unmatched"
        metrics.requests.observe(route, response.status, elapsed)
        log_request(
            method=request.method,
            route=route,
            status=response.status,
            # Microseconds, rounded, as milliseconds: round(x, 3) formats the float to do it.
            duration_ms=round(elapsed * 1e6) / 1000,
        )
        return response

    return middleware


def _answer_failure(
    exc: Exception, request: web.Request, max_body_bytes: int
) -> web.StreamResponse:
    """Turn what the handler raised into an envelope with the right status (a redirect goes
    on up; anything that is not an Exception, a cancellation, never comes here)."""
    if isinstance(exc, GatewayError):
        bind(error_code=exc.code, error_param=logged_param(exc.param))
        return error_response(exc, headers=exc.headers or None)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return _answered(_from_http(exc, request, max_body_bytes), headers=_allow(exc))
    if isinstance(exc, _UNSTORABLE):
        # The last net: a value the checks let through that PostgreSQL cannot hold. It is
        # the client's input, not an outage; nothing was stored.
        log.warning("unstorable_text", error_type=type(exc).__name__, route=_route(request))
        return _answered(
            InvalidRequest(
                "A value is one the store cannot keep (a NUL character, U+0000, or a number"
                " out of range); nothing was accepted. Correct it and send again.",
                code="invalid_value",
            )
        )
    if store_unavailable(exc):
        # Disk full, database locked past its timeout, store closing: nothing was
        # acknowledged, so the client may retry safely (duplicates are answered as such).
        log.error("store_unavailable", error_type=type(exc).__name__, route=_route(request))
        return _answered(
            ServiceUnavailable(
                "The store cannot be used right now (disk full, database locked, or a"
                " database that does not answer); nothing was accepted. Retry shortly.",
                code="store_unavailable",
            ),
            headers={"Retry-After": "1"},
        )
    # Every other surprise, whatever its type: one envelope, one traceback, one count.
    log.error("unhandled_error", route=_route(request), error_type=type(exc).__name__, exc_info=exc)
    return _answered(
        GatewayError(
            "Internal error. Retry, and report the X-Request-Id if it persists.",
            code="internal_error",
        )
    )


def _answered(error: GatewayError, *, headers: dict[str, str] | None = None) -> web.Response:
    """The envelope for ``error``, its code bound to the request's log line."""
    bind(error_code=error.code)
    return error_response(error, headers=headers)


# A wrong key, signature or metrics key (401), a wrong verify token (403).
_FAILED_AUTHENTICATION = frozenset({401, 403})


def _too_many_failures(wait: float) -> web.Response:
    error = RateLimited(
        f"Too many failed authentications from this address: this one is refused without"
        f" saying why for {wait:.0f} s more. Requests with valid credentials are not affected.",
        code="too_many_failed_authentications",
        details={"retryAfterSeconds": round(wait, 3)},
    )
    return _answered(error, headers={"Retry-After": str(max(1, math.ceil(wait)))})


# PostgreSQL's answers to values it cannot hold (SQLSTATE class 22: a NUL in text, a number
# out of range): the request's data, not an outage.
_UNSTORABLE = asyncpg.DataError


def _route(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


def _from_http(exc: web.HTTPException, request: web.Request, limit: int) -> GatewayError:
    if exc.status == 413:
        return too_large(limit)
    if exc.status == 404:
        hint = _PLUGIN_ROUTES.get(request.path, "see the README for the API")
        return NotFound(
            f"No endpoint at {request.method} {request.path[:200]}; {hint}.",
            code="route_not_found",
        )
    if exc.status == 405:
        allowed = sorted(getattr(exc, "allowed_methods", ()))
        return InvalidRequest(
            f"{request.method} is not allowed here; use {', '.join(allowed)}.",
            code="method_not_allowed",
            status=405,
            details={"allowed": allowed},
        )
    return InvalidRequest(exc.reason, code=f"http_{exc.status}", status=exc.status)


# Routes built-in plugins serve, for the 404 of a gateway that does not load them.
_PLUGIN_ROUTES = {
    "/v1/whatsapp/dataset": "the dataset endpoints come with the meta_capi (or test_mode) sink:"
    ' add it to [plugins] sinks, e.g. sinks = ["meta_capi"]',
}


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    allowed = getattr(exc, "allowed_methods", None)
    return {"Allow": ", ".join(sorted(allowed))} if allowed else None


def middlewares(
    *,
    max_body_bytes: int,
    metrics: Metrics,
    failures: FailureLimiter,
    trusted_proxies: Sequence[IPNetwork] = (),
    section: Section | None = None,
) -> list[Middleware]:
    """Return the app's middlewares (one: each layer costs every request a coroutine)."""
    return [make_middleware(max_body_bytes, metrics, failures, trusted_proxies, section)]
