"""``create_app(settings, plugins)``: the aiohttp application and the lifetimes of its resources."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping

from aiohttp import web

from gateway.auth import KeyRing
from gateway.config import Settings
from gateway.context import KEYS, PIPELINE, PLUGINS, SETTINGS
from gateway.middlewares import middlewares
from gateway.pipeline import Pipeline, check_normalizers
from gateway.plugin_manager import Plugins
from gateway.store import Store
from gateway.validation import iso_currencies
from gateway.views import routes

__all__ = ["create_app"]


def create_app(
    settings: Settings,
    plugins: Plugins,
    *,
    environ: Mapping[str, str],
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """Return the application; configuration errors raise ConfigError here, before serving."""
    keys = KeyRing.from_config(settings.auth, environ)
    plugins.check_config(settings)
    check_normalizers(settings, plugins)
    iso_currencies()  # load the currency list now rather than on the first request

    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=middlewares(max_body_bytes=settings.server.max_body_bytes),
    )
    app[SETTINGS] = settings
    app[PLUGINS] = plugins
    app[KEYS] = keys

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        store = await Store.open(settings.store_path(), max_batch=settings.store.group_commit_max)
        app[PIPELINE] = Pipeline(settings, plugins, store, clock=clock)
        try:
            yield
        finally:
            await store.close()

    app.cleanup_ctx.append(store_ctx)
    app.add_routes(routes)
    return app
