"""The gateway's running resources: the store, then the plugins' lifespans, as one context."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

import msgspec
import structlog

from gateway.capture.inbox import reprocess
from gateway.config import Settings
from gateway.delivery.service import DeliveryService
from gateway.erasure import suppression_key
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.plugin_manager import Plugins
from gateway.store.database import SqliteStore, Store
from gateway.store.engines import open_store
from gateway.store.locks import serving_lock
from gateway.store.postgres import PostgresStore
from gateway.store.retention import RetentionCutoffs

__all__ = ["housekeep", "new_event_loop", "running"]

log = structlog.get_logger()


def new_event_loop(choice: str) -> tuple[asyncio.AbstractEventLoop, str]:
    """Return the event loop ``serve`` runs on, and its name: uvloop unless ruled out."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError(
                    '[server] event_loop = "uvloop", but uvloop is not installed:'
                    ' pip install uvloop, or set it to "auto"'
                ) from None
        else:
            return uvloop.new_event_loop(), "uvloop"
    return asyncio.new_event_loop(), "asyncio"


async def housekeep(store: Store, settings: Settings) -> dict[str, int]:
    """Prune what is past its retention: webhook message ids and archived notifications,
    events, clicks and quiet conversations ([retention]); return what each removed."""
    now = time.time()
    log.info("housekeeping_started")
    webhook = settings.webhook
    keep = settings.retention
    pruned = await store.prune_messages(
        now - webhook.message_retention_days * 86400, keep.batch_rows
    )
    archived = await store.prune_archive(
        now - webhook.archive_retention_days * 86400, keep.batch_rows
    )
    if pruned or archived:
        log.info("webhook_data_pruned", message_ids=pruned, notifications=archived)
    window = settings.events.attribution_window_s
    removed = await store.apply_retention(
        RetentionCutoffs(
            conversations=now - keep.conversations_days * _DAY,
            clicks=now - window - keep.clicks_after_window_days * _DAY,
            delivered_events=now - keep.delivered_events_days * _DAY,
            failed_events=now - keep.failed_events_days * _DAY,
        ),
        keep.batch_rows,
    )
    if any(removed.values()):
        log.info("retention_applied", **removed)
    # Suppressions another process recorded take effect here too.
    await store.load_suppressions()
    return {"webhook_message_ids": pruned, "webhook_notifications": archived, **removed}


_DAY = 86400


async def _refresh_suppressions(store: Store, every_s: float) -> None:
    """Take in suppressions other processes recorded (``ctwa-gateway erase --suppress``)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await store.load_suppressions()
        except Exception:
            log.exception("suppressions_reload_failed")


async def _process_pending(store: Store, settings: Settings, *, before: float | None) -> None:
    """Process again the notifications whose processing failed as a whole (``pending``)."""
    try:
        report = await reprocess(store, settings, statuses=("pending",), before=before)
        if report.notifications:
            log.info("webhook_pending_processed", **msgspec.structs.asdict(report))
    except Exception:
        log.exception("webhook_pending_failed")


async def _background(store: Store, settings: Settings) -> None:
    """Process what a crash left pending, then keep the tables from growing forever."""
    await _process_pending(store, settings, before=None)
    interval = settings.store.housekeeping_interval_s
    # The first pass a minute after start, not an interval: startup stays quick, and a
    # process restarted more often than the interval (deploys, a crash loop) still prunes.
    wait = min(interval, _FIRST_PASS_S)
    while True:
        await asyncio.sleep(wait)
        wait = interval
        # A notification a fault left pending in a process that keeps running would wait for
        # the next start; one received a while ago is not being processed by anyone now.
        await _process_pending(store, settings, before=time.time() - _PENDING_AGE_S)
        try:
            await housekeep(store, settings)
        except Exception:
            log.exception("housekeeping_failed")


_FIRST_PASS_S = 60.0
_PENDING_AGE_S = 60.0


@asynccontextmanager
async def _housekeeping(store: Store, settings: Settings) -> AsyncIterator[None]:
    tasks = [
        asyncio.create_task(_background(store, settings), name="ctwa-housekeeping"),
        asyncio.create_task(
            _refresh_suppressions(store, settings.privacy.suppressions_refresh_s),
            name="ctwa-suppressions",
        ),
    ]
    try:
        yield
    finally:
        # Cancelled, never half-done: each prune and each notification is one transaction.
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


@asynccontextmanager
async def running(
    settings: Settings,
    plugins: Plugins,
    environ: Mapping[str, str],
    *,
    clock: Callable[[], float] = time.time,
    start_plugins: bool = True,
    metrics: Metrics | None = None,
    create_store: bool = True,
) -> AsyncIterator[Pipeline]:
    """Open the store and start the plugins; on exit stop them, flush and close the store.

    ``metrics`` defaults to a registry of this run's own (the CLI's); the app passes its own.

    ``start_plugins=False`` is for dry runs: nothing runs in the background.
    ``create_store=False`` is for commands that only read or fix an existing store.
    """
    metrics = metrics or Metrics()
    store = await open_store(settings, environ, create=create_store)
    store.suppression_key = suppression_key(settings, environ)
    store.writer.on_commit = metrics.observe_commit
    try:
        async with AsyncExitStack() as stack:
            delivery = None
            if start_plugins and isinstance(store, SqliteStore):
                # Held for as long as this process serves: `restore` refuses to run under it.
                serving = serving_lock(settings.store_path(), shared=True)
                if not serving.acquire():
                    raise ConfigError(
                        f"a restore is writing {settings.store_path()}: start once it is done"
                    )
                stack.callback(serving.release)
            if start_plugins:
                await stack.enter_async_context(_housekeeping(store, settings))
                # Entered in load order and exited in reverse: the dispatchers stop (and
                # record what they sent) before the plugins close what they send with, and
                # all of that before the store closes.
                for lifespan in plugins.lifespans(settings, store, environ, metrics):
                    await stack.enter_async_context(lifespan)
                service = DeliveryService(
                    plugins,
                    store.outbox,
                    sink_timeout_s=settings.plugins.sink_timeout_s,
                    metrics=metrics,
                    clock=clock,
                )
                delivery = await stack.enter_async_context(service.running())
                if isinstance(store, PostgresStore) and delivery.started:
                    # Another replica's new events wake this one's dispatchers too.
                    await store.listen(delivery.notify)
            yield Pipeline(
                settings, plugins, store, clock=clock, metrics=metrics, delivery=delivery
            )
    finally:
        await store.close()
