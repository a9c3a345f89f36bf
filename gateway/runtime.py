"""The gateway's running resources: the store, then the plugins' lifespans, as one context."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager

import structlog

from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.plugin_manager import Plugins
from gateway.store import Store

__all__ = ["running"]

log = structlog.get_logger()

_HOUSEKEEPING_S = 3600.0


async def _prune_forever(store: Store, retention_s: float) -> None:
    """Forget old webhook message ids hourly: the table would otherwise grow forever."""
    while True:
        # First an hour after start: startup stays quick and its writes predictable.
        await asyncio.sleep(_HOUSEKEEPING_S)
        try:
            pruned = await store.prune_messages(time.time() - retention_s)
            if pruned:
                log.info("webhook_messages_pruned", rows=pruned)
        except Exception:
            log.exception("housekeeping_failed")


@contextmanager
def _housekeeping(store: Store, settings: Settings) -> Iterator[None]:
    retention = settings.webhook.message_retention_days * 86400
    task = asyncio.create_task(_prune_forever(store, retention), name="ctwa-housekeeping")
    try:
        yield
    finally:
        # Cancelled, never half-done: each prune is one transaction.
        task.cancel()


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
                stack.enter_context(_housekeeping(store, settings))
                # Entered in load order and exited in reverse: dispatchers drain (and record
                # what they sent) before the store closes.
                for lifespan in plugins.lifespans(settings, store, environ, metrics):
                    await stack.enter_async_context(lifespan)
            yield Pipeline(settings, plugins, store, clock=clock, metrics=metrics)
    finally:
        await store.close()
