"""The host's delivery service: a durable outbox for every sink that sends through it.

A sink that implements ``gateway_send_events`` gets, for free, what the Meta sink has: its
pending deliveries committed with the event, a dispatcher that batches, retries with backoff,
expires and records every attempt, ``ctwa-gateway replay``, the outcome metrics and the
history in ``GET /v1/whatsapp/conversions/{eventId}``. A request waits up to the sink's
``respond_within_ms`` for its event's first attempt.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from gateway.delivery.dispatcher import Dispatcher
from gateway.domain import SinkState
from gateway.metrics import Metrics
from gateway.plugin_manager import Plugins
from gateway.store.outbox import Outbox

__all__ = ["DeliveryService"]


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

    @asynccontextmanager
    async def running(self) -> AsyncIterator[DeliveryService]:
        """Start every dispatcher; on exit let batches in flight finish, then stop."""
        for dispatcher in self.dispatchers.values():
            dispatcher.start()
        try:
            yield self
        finally:
            for dispatcher in self.dispatchers.values():
                await dispatcher.stop()

    def waits_for(self, sink: str, state: SinkState) -> bool:
        """Whether ``sink`` delivers ``state`` through the outbox (so a request may wait)."""
        return state.status == "pending" and sink in self.dispatchers

    async def outcome(self, sink: str, pk: int) -> SinkState | None:
        """Wake ``sink``'s dispatcher and wait (its ``respond_within_ms``) for event ``pk``'s
        first attempt; ``None`` if it has not happened yet."""
        dispatcher = self.dispatchers[sink]
        dispatcher.notify()
        return await dispatcher.outcome(pk, dispatcher.options.respond_within_ms / 1000)

    def readiness_problems(self) -> dict[str, str]:
        """Return, per outbox sink whose dispatcher is not running, what is wrong."""
        return {
            name: "its delivery dispatcher is not running"
            for name, dispatcher in self.dispatchers.items()
            if not dispatcher.running
        }
