"""Operator endpoints: ``/metrics``, ``/healthz``, ``/readyz`` and ``/openapi.json``."""

from __future__ import annotations

import importlib.metadata
import time

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.errors import ServiceUnavailable, Unauthorized
from gateway.http.auth import secret_matches
from gateway.http.keys import CREDENTIALS, METRICS, PIPELINE, PLUGINS
from gateway.http.openapi import build_openapi
from gateway.wire import ENCODER, Health

__all__ = ["routes"]

routes = web.RouteTableDef()
log = structlog.get_logger()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process answers: nothing else is checked (a liveness probe)."""
    return _json(Health(status="ok"))


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """The store takes writes (after writes failed for want of room or access, a probe
    writes too) and every plugin that runs in the background is running."""
    problems: dict[str, str] = {}
    unwritable = await request.app[PIPELINE].store.readiness.problem()
    if unwritable is not None:
        problems["store"] = unwritable
    problems.update(request.app[PLUGINS].readiness_problems())
    delivery = request.app[PIPELINE].delivery
    if delivery is not None:
        problems.update(delivery.readiness_problems())
    if problems:
        raise ServiceUnavailable(
            "Not ready: " + "; ".join(f"{name}: {why}" for name, why in problems.items()),
            code="not_ready",
            details={"checks": problems},
        )
    checks = {"store": "ok", **dict.fromkeys(request.app[PLUGINS].roles["sinks"], "ok")}
    # Said, not failed on: conversions still work without it, and a load balancer that took
    # the gateway out would stop those too.
    checks["webhook"] = (
        "ok"
        if request.app[CREDENTIALS].webhook.app_secret is not None
        else "not configured: notifications are refused with 503 until the variable"
        " [webhook] app_secret_env names is set"
    )
    return _json(Health(status="ready", checks=checks))


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition; outbox and status gauges are read from the store now."""
    key = request.app[CREDENTIALS].metrics_key
    if key:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret_matches(presented.strip(), key):
            raise Unauthorized(
                "Unauthorized: /metrics needs `Authorization: Bearer <metrics key>`.",
                code="invalid_metrics_key",
            )
    m = request.app[METRICS]
    pending, by_status = await request.app[PIPELINE].store.outbox.stats()
    now = time.time()
    for sink in request.app[PLUGINS].sink_names:
        count, oldest = pending.get(sink, (0, None))
        m.outbox_depth.labels(sink).set(count)
        m.outbox_oldest.labels(sink).set(0.0 if oldest is None else max(0.0, now - oldest))
    m.events_by_status.clear()
    for account, sink, status, count in by_status:
        m.events_by_status.labels(account, sink, status).set(count)
    store = request.app[PIPELINE].store
    for status, count in (await store.archive_counts()).items():
        m.webhook_archive_open.labels(status).set(count)
    m.store_lookups.labels("hit").set(store.lookups.hits)
    m.store_lookups.labels("miss").set(store.lookups.misses)
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of the routes this app serves."""
    try:
        version = importlib.metadata.version("ctwa-gateway")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return _json_dict(build_openapi(request.app, title="ctwa-gateway", version=version))


def _json(value: Health) -> web.Response:
    return web.Response(body=ENCODER.encode(value), content_type="application/json")


def _json_dict(value: dict[str, object]) -> web.Response:
    return web.Response(body=ENCODER.encode(value), content_type="application/json")
