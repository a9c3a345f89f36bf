"""How late the event loop runs: the one number that tells a stalled gateway from a slow
machine.

Every request, commit and delivery of a serving process goes through one event loop; anything
that holds it (a long synchronous call, a collection of a large heap, a paused VM) delays them
all at once, and the latency percentiles show only that something was slow. A timer set every
100 ms and measured when it fires says by how much the loop itself was late: a few
milliseconds on a busy loop (the turn it was serving), the whole stall when it was held.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog

from gateway.metrics import Metrics

__all__ = ["watching_loop"]

log = structlog.get_logger()

# Often enough that a stall of a few hundred ms is seen whole, rarely enough to cost nothing.
_EVERY_S = 0.1
# Far past a busy loop's turn (milliseconds) or a full collection (tens of ms): a stall.
_WARN_AFTER_S = 0.5


async def _watch(metrics: Metrics) -> None:
    loop = asyncio.get_running_loop()
    while True:
        set_at = loop.time()
        await asyncio.sleep(_EVERY_S)
        late = max(0.0, loop.time() - set_at - _EVERY_S)
        metrics.event_loop_lag.observe(late)
        if late >= _WARN_AFTER_S:
            # Every request in flight waited this long too: the line to look for when a
            # latency graph shows a spike.
            log.warning("event_loop_stalled", late_ms=round(late * 1000))


@contextlib.asynccontextmanager
async def watching_loop(metrics: Metrics) -> AsyncIterator[None]:
    """Measure the running loop's lateness into ``metrics`` (and log a stall) while inside."""
    task = asyncio.create_task(_watch(metrics), name="ctwa-loop-watch")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
