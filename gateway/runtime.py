"""The gateway's running resources: the store, then the plugins' lifespans, as one context."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.plugin_manager import Plugins
from gateway.store import Store

__all__ = ["running"]


@asynccontextmanager
async def running(
    settings: Settings,
    plugins: Plugins,
    environ: Mapping[str, str],
    *,
    clock: Callable[[], float] = time.time,
    start_plugins: bool = True,
    metrics: Metrics | None = None,
) -> AsyncIterator[Pipeline]:
    """Open the store and start the plugins; on exit stop them, flush and close the store.

    ``metrics`` defaults to a registry of this run's own (the CLI's); the app passes its own.

    ``start_plugins=False`` is for dry runs: nothing runs in the background.
    """
    metrics = metrics or Metrics()
    store = await Store.open(settings.store_path(), max_batch=settings.store.group_commit_max)
    try:
        async with AsyncExitStack() as stack:
            if start_plugins:
                # Entered in load order and exited in reverse: dispatchers drain (and record
                # what they sent) before the store closes.
                for lifespan in plugins.lifespans(settings, store, environ, metrics):
                    await stack.enter_async_context(lifespan)
            yield Pipeline(settings, plugins, store, clock=clock, metrics=metrics)
    finally:
        await store.close()
