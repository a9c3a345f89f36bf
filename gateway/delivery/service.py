"""The host's delivery service: a durable outbox for every sink that sends through it.

A sink that implements ``gateway_send_events`` gets, for free, what the Meta sink has: its
pending deliveries committed with the event, a dispatcher that batches, retries with backoff,
expires and records every attempt, ``ctwa-gateway replay``, the outcome metrics and the
history in ``GET /v1/whatsapp/conversions/{eventId}``. A request waits up to the primary
sink's ``respond_within_ms`` for its event's first attempt.

Every process on a store delivers: a second ``serve``, a ``ctwa-gateway send`` beside it, a
replica on PostgreSQL. They share the outbox through claims in the store (each delivery is
taken by one of them at a time, :mod:`gateway.store.outbox`), not through anything held in
memory, so no arrangement of processes sends an event twice outside the in-flight window.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import structlog

from gateway.delivery.dispatcher import Dispatcher
from gateway.domain import SinkState
from gateway.metrics import Metrics
from gateway.plugin_manager import Plugins
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
        # Unique to this process (host, pid, and a random part a reused pid does not share).
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self.dispatchers = {
            name: Dispatcher(
                sink=name,
                outbox=outbox,
                send=plugins.sender(name),
                options=plugins.delivery_options(name),
                send_timeout_s=sink_timeout_s,
                owner=self.owner,
                metrics=metrics,
                clock=clock,
            )
            for name in plugins.outbox_sinks
        }
        self._started = False

    @asynccontextmanager
    async def running(self) -> AsyncIterator[DeliveryService]:
        """Deliver; on exit let batches in flight finish, then stop and give back claims."""
        for dispatcher in self.dispatchers.values():
            dispatcher.start()
        self._started = bool(self.dispatchers)
        try:
            yield self
        finally:
            for dispatcher in self.dispatchers.values():
                await dispatcher.stop()
            self._started = False

    @property
    def started(self) -> bool:
        """Whether this process delivers through the outbox."""
        return self._started

    def waits_for(self, sink: str, state: SinkState) -> bool:
        """Whether a request may wait for ``sink`` to deliver ``state`` in this process."""
        return self._started and state.status == "pending" and sink in self.dispatchers

    def notify(self) -> None:
        """Say that new work was committed (every dispatcher looks at once)."""
        if self._started:
            for dispatcher in self.dispatchers.values():
                dispatcher.notify()

    def answer_window_s(self, sink: str) -> float:
        """How long a request waits for ``sink``'s first attempt (its ``respond_within_ms``)."""
        return self.dispatchers[sink].options.respond_within_ms / 1000

    async def outcome(self, sink: str, pk: int) -> SinkState | None:
        """Wait (``sink``'s ``respond_within_ms``) for event ``pk``'s first attempt; ``None``
        if it has not happened yet."""
        dispatcher = self.dispatchers[sink]
        return await dispatcher.outcome(pk, dispatcher.options.respond_within_ms / 1000)

    def readiness_problems(self) -> dict[str, str]:
        """Return, per outbox sink whose dispatcher is not running, what is wrong."""
        return {
            name: "its delivery dispatcher is not running"
            for name, dispatcher in self.dispatchers.items()
            if not dispatcher.running
        }
