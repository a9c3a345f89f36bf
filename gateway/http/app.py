"""``create_app(settings, plugins)``: the aiohttp application and the lifetimes of its resources."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping

import structlog
from aiohttp import web

from gateway.config import Settings
from gateway.console import CONSOLE_PATH, security_headers, setup_console
from gateway.credentials import Credentials, metrics_key
from gateway.errors import ConfigError
from gateway.http.auth import FailureLimiter, KeyRing
from gateway.http.body import BodyBudget
from gateway.http.keys import CREDENTIALS, METRICS, PIPELINE, PLUGINS, SETTINGS, WEBHOOK_BODIES
from gateway.http.middlewares import middlewares
from gateway.http.ops_views import routes as ops_routes
from gateway.http.report_views import routes as report_routes
from gateway.http.views import routes as api_routes
from gateway.http.webhook import routes as webhook_routes
from gateway.loop_watch import watching_loop
from gateway.metrics import Metrics
from gateway.pipeline import check_normalizers
from gateway.plugin_manager import Plugins
from gateway.runtime import running
from gateway.store.database import check_store_path
from gateway.validation import iso_currencies

__all__ = ["create_app", "reload_secrets", "startup_problems"]

log = structlog.get_logger()


def create_app(
    settings: Settings,
    plugins: Plugins,
    *,
    environ: Mapping[str, str],
    clock: Callable[[], float] = time.time,
    reload_environ: Callable[[], Mapping[str, str]] | None = None,
) -> web.Application:
    """Return the application; configuration errors raise ConfigError here, before serving.

    ``reload_environ``: where secrets are read again on SIGHUP (the CLI passes the process
    environment plus the ``[secrets] file``); None: no reloading.
    """
    problems = startup_problems(settings, plugins, environ)
    if problems:
        raise ConfigError(problems[0])
    credentials = Credentials.load(settings, environ)
    iso_currencies()  # load the currency list now rather than on the first request
    if credentials.webhook.app_secret is None:
        _warn_webhook_disabled()
    if not settings.webhook.archive:
        log.warning(
            "webhook_archive_disabled",
            reason="[webhook] archive = false: a notification whose processing fails gets a 503"
            " (Meta retries it) and unprocessed parts cannot be reprocessed",
        )
    # aiohttp's own limit is the larger of the routes'; each route enforces its own.
    largest = max(settings.server.max_body_bytes, settings.webhook.max_body_bytes)
    metrics = Metrics()
    credentials.keys.on_limited = lambda key: metrics.rate_limited.labels(key.name).inc()
    failures = FailureLimiter(
        rate_per_s=settings.auth.failed_per_s, burst=settings.auth.failed_burst
    )
    proxies = [ipaddress.ip_network(p, strict=False) for p in settings.server.trusted_proxies]
    app = web.Application(
        client_max_size=largest,
        # Bodies are inflated by gateway.http.body, held to each route's limit, and a coding
        # it does not take is answered in the envelope; aiohttp's parser would answer that
        # in plain text, before any handler runs.
        handler_args={
            "auto_decompress": False,
            # aiohttp's only deadline before a handler runs: no request in progress (idle, or
            # its headers still coming) for this long closes the connection.
            "keepalive_timeout": settings.server.idle_timeout_s,
            # How long a body the handler did not read (refused, or past its deadline) is
            # drained so the client sees the answer, before the connection closes.
            "lingering_time": settings.server.body_timeout_s,
        },
        middlewares=middlewares(
            max_body_bytes=largest,
            metrics=metrics,
            failures=failures,
            trusted_proxies=proxies,
            # Every answer under /console gets its CSP, whoever made it (404, 405, 429 too).
            section=(CONSOLE_PATH, security_headers) if settings.console.enabled else None,
        ),
    )
    app[METRICS] = metrics
    app[SETTINGS] = settings
    app[PLUGINS] = plugins
    app[CREDENTIALS] = credentials
    app[WEBHOOK_BODIES] = BodyBudget(
        settings.webhook.max_bytes_in_flight, retry_after_s=settings.server.body_timeout_s
    )

    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        async with running(settings, plugins, environ, clock=clock, metrics=metrics) as pipeline:
            app[PIPELINE] = pipeline
            # What start-up built (modules, numbering plans, the app) lives as long as the
            # process: out of the collector's sight, a full collection no longer walks it,
            # which took milliseconds off the p99 under load.
            gc.freeze()
            # A request's objects are freed by reference counting as it ends; with 64 in
            # flight, the default threshold (700 more allocations than frees) still ran a
            # young collection every ~40 requests, walking every in-flight request's objects:
            # about 5% of a conversion's CPU. At this threshold a loaded server ran none in
            # 40,000 requests; garbage in cycles is still collected, a little later. Like the
            # freeze, a setting of the process that serves: raised, never lowered, and kept
            # (apps in one process may stop in any order; a higher setting is left alone).
            young, *older = gc.get_threshold()
            if young < _YOUNG_COLLECTION_THRESHOLD:
                gc.set_threshold(_YOUNG_COLLECTION_THRESHOLD, *older)
            async with watching_loop(metrics):
                yield

    # Every answer, those aiohttp makes before the middleware (its Expect handler's 417)
    # included.
    app.on_response_prepare.append(_server_header)
    app.cleanup_ctx.append(runtime_ctx)
    if reload_environ is not None:
        app.cleanup_ctx.append(_on_sighup(reload_environ))
    # aiohttp's default Expect handler runs before any middleware and fails on odd values
    # with a bare 500: ours only answers 100-continue and lets the rest through.
    console_routes = setup_console(app, settings) if settings.console.enabled else []
    ours = [
        _with_expect(route)
        for route in [*api_routes, *report_routes, *webhook_routes, *ops_routes, *console_routes]
    ]
    app.add_routes(ours)
    taken = {(route.method, route.path): "the gateway" for route in ours}
    for name, plugin_route in plugins.routes():
        route = _with_expect(plugin_route)
        key = (route.method, route.path)
        # aiohttp would keep the first and ignore the other without a word.
        if key in taken:
            raise ConfigError(
                f"plugin {name!r}: its route {route.method} {route.path} is already served by"
                f" {taken[key]}"
            )
        taken[key] = f"plugin {name!r}"
        app.add_routes([route])
    return app


# Allocations of container objects, net of frees, between two young collections.
_YOUNG_COLLECTION_THRESHOLD = 10_000


def _with_expect(route: web.AbstractRouteDef) -> web.RouteDef:
    if not isinstance(route, web.RouteDef):
        raise ConfigError(f"{route!r}: routes must be web.RouteDef (web.get, web.post...)")
    return web.RouteDef(
        route.method, route.path, route.handler, {**route.kwargs, "expect_handler": _expect}
    )


async def _expect(request: web.Request) -> None:
    if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0


def startup_problems(settings: Settings, plugins: Plugins, environ: Mapping[str, str]) -> list[str]:
    """Return every reason ``serve`` would refuse to start (``check-config`` lists them all)."""
    checks: list[Callable[[], object]] = [
        lambda: KeyRing.from_config(settings.auth, environ),
        lambda: plugins.check_config(settings, environ),
        lambda: check_normalizers(settings, plugins),
        lambda: metrics_key(settings, environ),
        lambda: (
            settings.store_url(environ)
            if settings.uses_postgres()
            else check_store_path(settings.store_path())
        ),
    ]
    problems = []
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def reload_secrets(app: web.Application, environ: Mapping[str, str]) -> bool:
    """Swap in the secrets of ``environ`` if they pass startup's checks; else keep the old."""
    settings, plugins = app[SETTINGS], app[PLUGINS]
    problems = startup_problems(settings, plugins, environ)
    if problems:
        log.error("secrets_reload_refused", problem=problems[0], kept="the running secrets")
        return False
    credentials = Credentials.load(settings, environ)
    changed = app[CREDENTIALS].replace_with(credentials)
    changed += plugins.reload_secrets(settings, environ)
    log.info("secrets_reloaded", changed=changed)
    if credentials.webhook.app_secret is None:
        _warn_webhook_disabled()
    return True


def _warn_webhook_disabled() -> None:
    log.warning(
        "webhook_disabled",
        reason="no app secret: [webhook] app_secret_env is unset or names an empty variable;"
        " every notification will be refused with 503",
    )


def _on_sighup(
    reload_environ: Callable[[], Mapping[str, str]],
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def handler(app: web.Application) -> AsyncIterator[None]:
        def reload() -> None:
            try:
                environ = reload_environ()
            except ConfigError as exc:
                log.error("secrets_reload_refused", problem=str(exc), kept="the running secrets")
                return
            reload_secrets(app, environ)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reload)
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    return handler


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp's default names Python's and its own versions: a map for scanners.
    response.headers["Server"] = "ctwa-gateway"
