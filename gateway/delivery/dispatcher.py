"""The outbox dispatcher: pending events to Meta in batches, retried until Meta answers.

One task per sink and process. It takes due deliveries from the outbox, groups them by
(dataset, token, test event code), sends batches of up to ``batch_max`` (waiting up to
``linger_ms`` to fill one), and records every outcome in one transaction per batch:

- delivered: Meta's ``events_received``, ``fbtrace_id`` and any warning ``messages``;
- a whole-batch rejection that one bad event can explain (code 100) is split in halves until the
  bad events are alone; they fail with Meta's reason, the good ones go through. Meta rejects the
  whole request in that case, so nothing is sent twice;
- transient failures retry with exponential backoff and jitter; throttling holds that dataset's
  deliveries (honouring ``Retry-After``) while other datasets carry on;
- an event that would be older than ``max_age_s`` at its next attempt expires instead.

Restart safety: a delivery stays ``pending`` until its outcome is committed, so a crash resends
at most the batches in flight at that moment (Meta had accepted them, the gateway had not yet
written it down); at any other point nothing is lost or sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from gateway.domain import Attempt, SinkState
from gateway.metrics import Metrics
from gateway.store.outbox import AttemptResult, Outbox, OutboxItem
from plugins.meta_capi.body import meta_request_body
from plugins.meta_capi.graph import GraphClient, GraphReply, explain

__all__ = ["DispatchSettings", "Dispatcher", "Route"]

log = structlog.get_logger()


@dataclass(frozen=True)
class DispatchSettings:
    batch_max: int
    linger_s: float
    retry_base_s: float
    retry_cap_s: float
    max_age_s: float
    max_in_flight: int
    partner_agent: str
    forced_test_event_code: str | None = None
    # The longest the dispatcher sleeps without looking: work another process queued
    # (``ctwa-gateway replay``) is picked up within this many seconds.
    poll_s: float = 5.0


@dataclass(frozen=True)
class Route:
    """Where an account's events go: its dataset and token."""

    dataset_id: str
    token: str


class Dispatcher:
    """Sends one sink's pending deliveries; :meth:`outcome` lets a request wait for its own."""

    def __init__(
        self,
        *,
        sink: str,
        outbox: Outbox,
        graph: GraphClient,
        routes: dict[str, Route],
        settings: DispatchSettings,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sink = sink
        self.metrics = metrics or Metrics()
        self.outbox = outbox
        self.graph = graph
        self.routes = routes
        self.settings = settings
        self.clock = clock
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()
        self._waiters: dict[int, list[asyncio.Future[SinkState]]] = {}
        # Outcomes recorded before their request started waiting (the dispatcher was quicker).
        self._recent: OrderedDict[int, SinkState] = OrderedDict()
        self._sends: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start dispatching; pending deliveries left by an earlier run go first."""
        self._task = asyncio.create_task(self._run(), name=f"ctwa-dispatcher-{self.sink}")

    async def stop(self, grace_s: float) -> None:
        """Stop taking work; let batches in flight finish within ``grace_s``, then cancel."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._sends:
            _, late = await asyncio.wait(self._sends, timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
                log.warning("dispatcher_stopped_in_flight", sink=self.sink, batches=len(late))
        for futures in self._waiters.values():
            for future in futures:
                future.cancel()

    def notify(self) -> None:
        """Say that new work was committed."""
        self._wake.set()

    async def outcome(self, pk: int, timeout_s: float) -> SinkState | None:
        """Wait up to ``timeout_s`` for the first attempt on event ``pk``; ``None`` if none yet."""
        if pk in self._recent:
            return self._recent[pk]
        future: asyncio.Future[SinkState] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(pk, []).append(future)
        self._wake.set()
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return None
        finally:
            waiting = self._waiters.get(pk)
            if waiting is not None and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._waiters[pk]

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            # Cleared before looking for work: a notify() that lands while we look is kept,
            # and the wait below returns at once.
            self._wake.clear()
            try:
                await self._dispatch_due()
                next_due = await self.outbox.next_due(self.sink)
            except Exception:
                # A store error must not kill the dispatcher: log, back off, try again.
                log.exception("dispatcher_error", sink=self.sink)
                next_due = self.clock() + 1.0
            timeout = (
                self.settings.poll_s if next_due is None else max(0.0, next_due - self.clock())
            )
            if self._in_flight and timeout == 0.0:
                timeout = (
                    self.settings.poll_s
                )  # what is due is in flight; a finishing batch wakes us
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(timeout, self.settings.poll_s))

    async def _dispatch_due(self) -> None:
        s = self.settings
        capacity = s.batch_max * s.max_in_flight
        items = await self._due(capacity)
        if items and len(items) < s.batch_max and s.linger_s > 0 and self._sends:
            # A partial batch while others are in flight: waiting to fill it costs no
            # throughput. With nothing in flight it goes at once (no latency for a lone event).
            await asyncio.sleep(s.linger_s)
            items = await self._due(capacity)
        groups: dict[tuple[str, str, str | None], list[OutboxItem]] = {}
        unroutable: list[OutboxItem] = []
        for item in items:
            route = self.routes.get(item.account_id)
            if route is None:
                # Accepted while the account had a dataset, which config no longer gives it.
                unroutable.append(item)
                continue
            code = s.forced_test_event_code or item.test_event_code
            groups.setdefault((route.dataset_id, route.token, code), []).append(item)
        if unroutable:
            await self.outbox.record(
                self.sink,
                [
                    self._final(
                        item,
                        "failed",
                        [],
                        error=f"account {item.account_id!r} has no dataset or token now: fix"
                        " its [[accounts]] entry, then run `ctwa-gateway replay`",
                        code="no_route",
                    )
                    for item in unroutable
                ],
            )
        for (dataset_id, token, code), group in groups.items():
            for start in range(0, len(group), s.batch_max):
                batch = group[start : start + s.batch_max]
                self._in_flight.update(item.pk for item in batch)
                task = asyncio.create_task(self._send(Route(dataset_id, token), code, batch))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)

    async def _due(self, limit: int) -> list[OutboxItem]:
        # A snapshot taken before the read: a batch that completes while the read is under way
        # leaves the in-flight set, but the read may still show its events as pending. Judged
        # against the live set they would be sent again.
        in_flight = frozenset(self._in_flight)
        return await self.outbox.due(self.sink, now=self.clock(), limit=limit, exclude=in_flight)

    async def _send(self, route: Route, code: str | None, batch: list[OutboxItem]) -> None:
        try:
            async with self._slots:
                results = await self._round(route, code, batch)
            await self.outbox.record(self.sink, results)
        except Exception:
            log.exception("dispatcher_batch_error", sink=self.sink, events=len(batch))
            # Hold the batch back a while: a fault that repeats must not become a busy loop.
            await self._hold(batch)
            return
        finally:
            self._in_flight.difference_update(item.pk for item in batch)
            self._wake.set()
        accounts = {item.pk: item.account_id for item in batch}
        for result in results:
            outcome = "retry" if result.state.status == "pending" else result.state.status
            self.metrics.events_outcome.labels(accounts[result.pk], self.sink, outcome).inc()
            self._settle(result.pk, result.state)
        self._report(batch, results)

    def _report(self, batch: list[OutboxItem], results: list[AttemptResult]) -> None:
        """Log, once, every outcome a person must act on: ids, Meta's code and the fix."""
        items = {item.pk: item for item in batch}
        groups: dict[tuple[str, str, str | None, str | None], list[AttemptResult]] = {}
        for result in results:
            state = result.state
            if state.status in ("failed", "expired"):
                event = f"delivery_{state.status}"
            elif state.status == "pending" and state.attempts in _RETRY_ALERTS:
                event = "delivery_retrying"
            else:
                continue
            key = (event, items[result.pk].account_id, state.error_code, state.error)
            groups.setdefault(key, []).append(result)
        for (event, account, code, reason), group in groups.items():
            log.warning(
                event,
                sink=self.sink,
                account=account,
                events=len(group),
                event_ids=[items[r.pk].event_id[:64] for r in group[:_LOGGED_IDS]],
                attempts=max(r.state.attempts for r in group),
                code=code,
                trace_id=group[0].state.trace_id,
                reason=reason,
            )

    async def _hold(self, batch: list[OutboxItem]) -> None:
        until = self.clock() + self.settings.retry_cap_s
        held = [
            AttemptResult(
                pk=item.pk,
                state=SinkState(
                    status="pending",
                    attempts=item.attempts,
                    error="will retry: internal error while sending (see the gateway log)",
                    error_code="internal",
                ),
                next_attempt_at=until,
            )
            for item in batch
        ]
        try:
            await self.outbox.record(self.sink, held)
        except Exception:
            log.exception("dispatcher_hold_failed", sink=self.sink, events=len(batch))

    def _settle(self, pk: int, state: SinkState) -> None:
        self._recent[pk] = state
        while len(self._recent) > 10_000:
            self._recent.popitem(last=False)
        for future in self._waiters.pop(pk, []):
            if not future.done():
                future.set_result(state)

    # -- one round of attempts for one batch -----------------------------------------------

    async def _round(
        self, route: Route, code: str | None, batch: list[OutboxItem]
    ) -> list[AttemptResult]:
        now = self.clock()
        results: list[AttemptResult] = []
        fresh: list[OutboxItem] = []
        for item in batch:
            if now - item.event_time > self.settings.max_age_s:
                results.append(self._final(item, "expired", [], error=_too_old(self.settings)))
            else:
                fresh.append(item)
        tries: dict[int, list[Attempt]] = {item.pk: [] for item in fresh}
        if fresh:
            results.extend(await self._attempt(route, code, fresh, tries))
        return results

    async def _attempt(
        self,
        route: Route,
        code: str | None,
        items: Sequence[OutboxItem],
        tries: dict[int, list[Attempt]],
    ) -> list[AttemptResult]:
        body = meta_request_body(
            [item.event for item in items],
            partner_agent=self.settings.partner_agent,
            test_event_code=code,
        )
        reply = await self.graph.send_events(route.dataset_id, route.token, body)
        self.metrics.meta_seconds.labels(reply.kind).observe(reply.duration_ms / 1000)
        if reply.kind != "ok":
            self.metrics.meta_errors.labels(reply.error_code()).inc()
        now = self.clock()
        for item in items:
            tries[item.pk].append(
                Attempt(
                    sink=self.sink,
                    attempt=item.attempts + len(tries[item.pk]) + 1,
                    at=now,
                    outcome=reply.kind if reply.kind != "ok" else "delivered",
                    http_status=reply.http_status,
                    error_code=None if reply.kind == "ok" else reply.error_code(),
                    message=None if reply.kind == "ok" else explain(reply),
                    trace_id=reply.trace_id,
                    batch_size=len(items),
                    duration_ms=reply.duration_ms,
                )
            )
        if reply.kind == "ok":
            return self._delivered(items, reply, tries)
        if reply.kind == "permanent":
            if len(items) > 1 and reply.is_event_level():
                half = len(items) // 2
                left = await self._attempt(route, code, items[:half], tries)
                right = await self._attempt(route, code, items[half:], tries)
                return left + right
            return [
                self._final(item, "failed", tries[item.pk], error=explain(reply), reply=reply)
                for item in items
            ]
        return await self._retry_later(route, items, reply, tries)

    def _delivered(
        self, items: Sequence[OutboxItem], reply: GraphReply, tries: dict[int, list[Attempt]]
    ) -> list[AttemptResult]:
        warnings = list(reply.warnings)
        if reply.events_received is not None and reply.events_received != len(items):
            # Meta does not say which ones; resending could count some twice, so keep the
            # discrepancy with every event instead.
            warnings.append(f"events_received {reply.events_received} of {len(items)} sent")
            log.warning(
                "meta_count_mismatch",
                sink=self.sink,
                sent=len(items),
                received=reply.events_received,
                trace_id=reply.trace_id,
            )
        return [
            AttemptResult(
                pk=item.pk,
                state=SinkState(
                    status="delivered",
                    attempts=item.attempts + len(tries[item.pk]),
                    trace_id=reply.trace_id,
                    events_received=1,
                    warnings=warnings or None,
                ),
                attempts=tries[item.pk],
            )
            for item in items
        ]

    def _final(
        self,
        item: OutboxItem,
        status: str,
        attempts: list[Attempt],
        *,
        error: str,
        reply: GraphReply | None = None,
        code: str | None = None,
    ) -> AttemptResult:
        return AttemptResult(
            pk=item.pk,
            state=SinkState(
                status=status,  # type: ignore[arg-type]
                attempts=item.attempts + len(attempts),
                error=error,
                error_code=reply.error_code() if reply else (code or status),
                trace_id=reply.trace_id if reply else None,
            ),
            attempts=attempts,
        )

    async def _retry_later(
        self,
        route: Route,
        items: Sequence[OutboxItem],
        reply: GraphReply,
        tries: dict[int, list[Attempt]],
    ) -> list[AttemptResult]:
        s = self.settings
        now = self.clock()
        results: list[AttemptResult] = []
        for item in items:
            attempts = item.attempts + len(tries[item.pk])
            delay = min(s.retry_cap_s, s.retry_base_s * 2 ** (attempts - 1))
            delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security
            if reply.kind == "throttled":
                delay = max(delay, reply.retry_after or 0.0, s.retry_base_s * 4)
            when = now + delay
            if when - item.event_time > s.max_age_s:
                results.append(
                    self._final(item, "expired", tries[item.pk], error=_too_old(s), reply=reply)
                )
                continue
            results.append(
                AttemptResult(
                    pk=item.pk,
                    state=SinkState(
                        status="pending",
                        attempts=attempts,
                        error=f"will retry: {explain(reply)}",
                        error_code=reply.error_code(),
                        trace_id=reply.trace_id,
                    ),
                    attempts=tries[item.pk],
                    next_attempt_at=when,
                )
            )
        if reply.kind == "throttled":
            held = max((r.next_attempt_at or now) for r in results) if results else now
            accounts = [a for a, r in self.routes.items() if r.dataset_id == route.dataset_id]
            log.warning(
                "meta_throttled",
                sink=self.sink,
                accounts=accounts,
                dataset_id=route.dataset_id,
                code=reply.error_code(),
                hold_s=round(held - now, 1),
            )
            await self.outbox.defer(self.sink, accounts, held)
        return results


# A delivery still retrying after this many attempts is worth a look (once each).
_RETRY_ALERTS = frozenset({3, 10, 30})
_LOGGED_IDS = 20


def _too_old(settings: DispatchSettings) -> str:
    days = settings.max_age_s / 86400
    return f"expired: older than {days:g} days before Meta could take it; Meta would reject it"
