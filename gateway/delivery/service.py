"""The host's delivery service: a durable outbox for every sink that sends through it.

A sink that implements ``gateway_send_events`` gets, for free, what the Meta sink has: its
pending deliveries committed with the event, a dispatcher that batches, retries with backoff,
expires and records every attempt, ``ctwa-gateway replay``, the outcome metrics and the
history in ``GET /v1/whatsapp/conversions/{eventId}``. A request waits up to the primary
sink's ``respond_within_ms`` for its event's first attempt.

One process delivers for a store: the dispatchers run only while this process holds an
exclusive lock on ``<store>.delivery.lock``. Another process on the same store (a second
``serve``, ``ctwa-gateway send``) stores events and leaves them to the holder, and takes over
within a second if the holder goes away; two dispatchers never read the same outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import structlog

from gateway.delivery.dispatcher import Dispatcher
from gateway.domain import SinkState
from gateway.metrics import Metrics
from gateway.plugin_manager import Plugins
from gateway.store.locks import FileLock
from gateway.store.outbox import Outbox

__all__ = ["DeliveryService"]

log = structlog.get_logger()


class DeliveryService:
    """One dispatcher per outbox sink, started and stopped with the app."""

    def __init__(
        self,
        plugins: Plugins,
        outbox: Outbox,
        *,
        sink_timeout_s: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dispatchers = {
            name: Dispatcher(
                sink=name,
                outbox=outbox,
                send=plugins.sender(name),
                options=plugins.delivery_options(name),
                send_timeout_s=sink_timeout_s,
                metrics=metrics,
                clock=clock,
            )
            for name in plugins.outbox_sinks
        }
        self._started = False

    @asynccontextmanager
    async def running(self, lock: FileLock) -> AsyncIterator[DeliveryService]:
        """Deliver while holding ``lock`` (at once, or when its holder goes away); on exit let
        batches in flight finish, then stop and release it."""
        standby: asyncio.Task[None] | None = None
        if not self.dispatchers:
            pass  # nothing delivers through the outbox: no lock to take
        elif lock.acquire():
            self._start()
        else:
            log.info("delivery_standby", lock=str(lock.path), reason="another process delivers")
            standby = asyncio.create_task(self._take_over(lock), name="ctwa-delivery-standby")
        try:
            yield self
        finally:
            if standby is not None:
                standby.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await standby
            if self.started:
                for dispatcher in self.dispatchers.values():
                    await dispatcher.stop()
            lock.release()

    @property
    def started(self) -> bool:
        """Whether this process delivers (it holds the store's delivery lock)."""
        return self._started

    def _start(self) -> None:
        for dispatcher in self.dispatchers.values():
            dispatcher.start()
        self._started = True

    async def _take_over(self, lock: FileLock) -> None:
        # A file lock has no wake-up to wait on: polling it is the only way.
        while not lock.acquire():  # noqa: ASYNC110
            await asyncio.sleep(_STANDBY_POLL_S)
        log.info("delivery_taken_over", lock=str(lock.path))
        self._start()

    def waits_for(self, sink: str, state: SinkState) -> bool:
        """Whether a request may wait for ``sink`` to deliver ``state`` in this process."""
        return self._started and state.status == "pending" and sink in self.dispatchers

    def notify(self) -> None:
        """Say that new work was committed (every dispatcher looks at once)."""
        if self._started:
            for dispatcher in self.dispatchers.values():
                dispatcher.notify()

    async def outcome(self, sink: str, pk: int) -> SinkState | None:
        """Wait (``sink``'s ``respond_within_ms``) for event ``pk``'s first attempt; ``None``
        if it has not happened yet."""
        dispatcher = self.dispatchers[sink]
        return await dispatcher.outcome(pk, dispatcher.options.respond_within_ms / 1000)

    def readiness_problems(self) -> dict[str, str]:
        """Return, per outbox sink whose dispatcher is not running, what is wrong (none while
        another process delivers: this one stores events for it)."""
        if not self._started:
            return {}
        return {
            name: "its delivery dispatcher is not running"
            for name, dispatcher in self.dispatchers.items()
            if not dispatcher.running
        }


# How often a standby process tries to take over delivery.
_STANDBY_POLL_S = 1.0
