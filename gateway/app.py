"""``create_app(settings, plugins)``: the aiohttp application and the lifetimes of its resources."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping

import structlog
from aiohttp import web

from gateway.auth import KeyRing
from gateway.config import Settings
from gateway.context import KEYS, METRICS, METRICS_KEY, PIPELINE, PLUGINS, SETTINGS, WEBHOOK_SECRETS
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.middlewares import middlewares
from gateway.ops_views import routes as ops_routes
from gateway.pipeline import check_normalizers
from gateway.plugin_manager import Plugins
from gateway.runtime import running
from gateway.signature import WebhookSecrets
from gateway.validation import iso_currencies
from gateway.views import routes as api_routes
from gateway.webhook import routes as webhook_routes

__all__ = ["create_app", "startup_problems"]

log = structlog.get_logger()


def create_app(
    settings: Settings,
    plugins: Plugins,
    *,
    environ: Mapping[str, str],
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """Return the application; configuration errors raise ConfigError here, before serving."""
    problems = startup_problems(settings, plugins, environ)
    if problems:
        raise ConfigError(problems[0])
    keys = KeyRing.from_config(settings.auth, environ)
    iso_currencies()  # load the currency list now rather than on the first request

    secrets = WebhookSecrets.from_config(settings.webhook, environ)
    if secrets.app_secret is None:
        log.warning(
            "webhook_disabled",
            reason="no app secret: [webhook] app_secret_env is unset or names an empty variable;"
            " every notification will be refused with 503",
        )
    if not settings.webhook.archive:
        log.warning(
            "webhook_archive_disabled",
            reason="[webhook] archive = false: a notification whose processing fails gets a 503"
            " (Meta retries it) and unprocessed parts cannot be reprocessed",
        )
    # aiohttp's own limit is the larger of the routes'; each route enforces its own.
    largest = max(settings.server.max_body_bytes, settings.webhook.max_body_bytes)
    metrics = Metrics()
    keys.on_limited = lambda key: metrics.rate_limited.labels(key.name).inc()
    app = web.Application(
        client_max_size=largest, middlewares=middlewares(max_body_bytes=largest, metrics=metrics)
    )
    app[METRICS] = metrics
    app[METRICS_KEY] = _metrics_key(settings, environ)
    app[SETTINGS] = settings
    app[PLUGINS] = plugins
    app[KEYS] = keys
    app[WEBHOOK_SECRETS] = secrets

    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        async with running(settings, plugins, environ, clock=clock, metrics=metrics) as pipeline:
            app[PIPELINE] = pipeline
            yield

    app.on_response_prepare.append(_server_header)
    app.cleanup_ctx.append(runtime_ctx)
    app.add_routes(api_routes)
    app.add_routes(webhook_routes)
    app.add_routes(ops_routes)
    app.add_routes(plugins.routes())
    return app


def startup_problems(settings: Settings, plugins: Plugins, environ: Mapping[str, str]) -> list[str]:
    """Return every reason ``serve`` would refuse to start (``check-config`` lists them all)."""
    checks: list[Callable[[], object]] = [
        lambda: KeyRing.from_config(settings.auth, environ),
        lambda: plugins.check_config(settings, environ),
        lambda: check_normalizers(settings, plugins),
        lambda: _metrics_key(settings, environ),
    ]
    problems = []
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp's default names Python's and its own versions: a map for scanners.
    response.headers["Server"] = "ctwa-gateway"


def _metrics_key(settings: Settings, environ: Mapping[str, str]) -> str:
    """Return the key /metrics requires ("" when open); a named but unset variable is an error."""
    name = settings.metrics.key_env
    if name is None:
        return ""
    value = environ.get(name, "")
    if not value:
        raise ConfigError(f"[metrics] key_env names {name}, which is not set")
    return value
