"""The outbox dispatcher: one sink's pending deliveries, sent in batches until each has an outcome.

One task per sink and process. It takes due deliveries from the outbox, hands them to the
sink's ``gateway_send_events`` in batches of up to ``batch_max`` (waiting up to ``linger_ms``
to fill one while others are in flight), one call per batch (or, for a sink that asks,
``call_per_account``, one per account and test event code of the batch, all at once), and
records each call's outcomes in one transaction as soon as it returns, with one attempt row
per event (with ``call_per_account``, one account's fault or slowness costs the others
nothing):

- ``delivered`` and ``failed`` are final (a failed one can be replayed by the operator);
- ``retry`` comes back after exponential backoff with jitter, no sooner than the sink's
  ``retry_after_s``; ``hold_account`` holds that account's other deliveries as long, and
  those this process takes meanwhile (new events) are put back unsent until then;
- an event older than ``max_age_s`` at its next attempt expires instead;
- a sink that raises, hangs past its send timeout or answers out of contract holds that
  call's events back for ``retry_cap_s`` (a fault that repeats must not become a busy loop),
  logged once with its traceback.

Several processes may deliver from one store: each claims what it sends (a lease in the row,
:mod:`gateway.store.outbox`), renews the lease while the batch is in flight and records the
outcome only while the claim is still its own.

Restart safety: a delivery stays ``pending`` until its outcome is committed, so a crash resends
at most the batches in flight at that moment (the destination had taken them, the gateway had
not yet written it down), once their leases expire; at any other point nothing is lost or sent
twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import structlog

from gateway.domain import Attempt, DeliveryOptions, QueuedEvent, SendOutcome, SinkState
from gateway.logs import scrub
from gateway.metrics import Metrics
from gateway.plugin_manager import is_plugin_fault
from gateway.store.outbox import AttemptResult, Outbox

__all__ = ["Dispatcher", "SendEvents"]

log = structlog.get_logger()

# How long a waiting request first waits before looking in the store for another replica's
# attempt (then twice as long each time).
_FIRST_LOOK_S = 0.05

SendEvents = Callable[[list[QueuedEvent]], Awaitable[list[SendOutcome]]]


class Dispatcher:
    """Sends one sink's pending deliveries; :meth:`outcome` lets a request wait for its own."""

    def __init__(
        self,
        *,
        sink: str,
        outbox: Outbox,
        send: SendEvents,
        options: DeliveryOptions,
        send_timeout_s: float,
        owner: str,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sink = sink
        # The name this dispatcher's claims carry: unique to the process.
        self.owner = owner
        self.metrics = metrics or Metrics()
        self.outbox = outbox
        self.send = send
        self.options = options
        self.send_timeout_s = options.send_timeout_s or send_timeout_s
        self.clock = clock
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()
        self._waiters: dict[int, list[asyncio.Future[SinkState]]] = {}
        # Outcomes recorded before their request started waiting (the dispatcher was quicker).
        self._recent: OrderedDict[int, SinkState] = OrderedDict()
        self._sends: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(options.max_in_flight)
        self._task: asyncio.Task[None] | None = None
        self._renewing: asyncio.Task[None] | None = None
        # When the claims in flight were last renewed (all of them at once).
        self._renewed_at = 0.0
        self._stopping = False
        # Accounts a sink asked to hold (throttling), until when: what this process claims of
        # theirs meanwhile, new events included, waits too rather than meeting the limit.
        self._holds: dict[str, float] = {}

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start dispatching; pending deliveries left by an earlier run go first."""
        self._task = asyncio.create_task(self._run(), name=f"ctwa-dispatcher-{self.sink}")
        self._renewing = asyncio.create_task(
            self._renew(), name=f"ctwa-dispatcher-{self.sink}-claims"
        )

    async def stop(self) -> None:
        """Stop taking work; let batches in flight finish within the grace time, then cancel."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._sends:
            _, late = await asyncio.wait(self._sends, timeout=self.options.shutdown_grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
                log.warning("dispatcher_stopped_in_flight", sink=self.sink, batches=len(late))
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        try:
            # What was cut off goes back now, not when its lease runs out.
            await self.outbox.release(self.sink, owner=self.owner)
        except Exception:
            log.exception("dispatcher_release_failed", sink=self.sink)
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
            return await self._first_outcome(pk, future, timeout_s)
        finally:
            waiting = self._waiters.get(pk)
            if waiting is not None and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._waiters[pk]

    async def _first_outcome(
        self, pk: int, future: asyncio.Future[SinkState], timeout_s: float
    ) -> SinkState | None:
        """Wait for this process's first attempt on ``pk``. While this process does not hold
        it, look in the store now and then, sooner first: another replica may have claimed and
        sent it, and its outcome settles no waiter here (the request would wait out its
        whole ``respond_within_ms`` and answer 202 for an event Meta took at once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pause = _FIRST_LOOK_S
        while (left := deadline - loop.time()) > 0:
            done, _ = await asyncio.wait((future,), timeout=min(pause, left))
            if done:
                return future.result()
            if pk not in self._in_flight:
                state = await self.outbox.attempted(self.sink, pk)
                if state is not None:
                    return state
            pause *= 2
        return future.result() if future.done() else None

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        poll_s = self.options.poll_s
        while not self._stopping:
            # Cleared before looking for work: a notify() that lands while we look is kept,
            # and the wait below returns at once.
            self._wake.clear()
            try:
                await self._dispatch_due()
                next_due = await self.outbox.next_due(self.sink, now=self.clock(), owner=self.owner)
            except Exception:
                # A store error must not kill the dispatcher: log, back off, try again.
                log.exception("dispatcher_error", sink=self.sink)
                next_due = self.clock() + 1.0
            timeout = poll_s if next_due is None else max(0.0, next_due - self.clock())
            if self._in_flight and timeout == 0.0:
                # What is due is in flight; a finishing batch wakes us.
                timeout = poll_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(timeout, poll_s))

    async def _dispatch_due(self) -> None:
        o = self.options
        # No more than the free slots can send now: what would wait here for a slot is held
        # from every other process that could send it at once, and its lease runs meanwhile.
        room = (o.max_in_flight - len(self._sends)) * o.batch_max
        claimed_at = self.clock()
        items = await self._claim(room)
        try:
            if items and len(items) < o.batch_max and o.linger_ms > 0 and self._sends:
                # A partial batch while others are in flight: waiting to fill it costs no
                # throughput. With nothing in flight it goes at once (no latency for a lone
                # event).
                await asyncio.sleep(o.linger_ms / 1000)
                items += await self._claim(min(o.batch_max, room) - len(items))
        finally:
            # Whatever was claimed is sent, even if the second look failed.
            for start in range(0, len(items), o.batch_max):
                batch = items[start : start + o.batch_max]
                task = asyncio.create_task(self._send(batch, claimed_at))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)

    async def _claim(self, limit: int) -> list[QueuedEvent]:
        if limit <= 0:
            return []
        items = await self.outbox.claim(
            self.sink,
            owner=self.owner,
            now=self.clock(),
            lease_s=self.options.claim_lease_s,
            limit=limit,
        )
        # A lease of ours that ran out before its renewal (a stalled loop) is taken again by
        # this claim: still ours, and still in flight here.
        items = [item for item in items if item.pk not in self._in_flight]
        self._in_flight.update(item.pk for item in items)
        return items

    async def _renew(self) -> None:
        """Keep the claims on what is in flight alive (a slow destination, a long retry)."""
        lease_s = self.options.claim_lease_s
        while True:
            await asyncio.sleep(lease_s / 3)
            if not self._in_flight:
                continue
            try:
                now = self.clock()
                await self.outbox.renew(
                    self.sink,
                    owner=self.owner,
                    pks=sorted(self._in_flight),
                    now=now,
                    lease_s=lease_s,
                )
                self._renewed_at = now
            except Exception:
                log.exception("dispatcher_renew_failed", sink=self.sink)

    def _lease_left(self, claimed_at: float) -> float:
        """Seconds until a claim taken at ``claimed_at`` (and renewed since, if it was) runs
        out."""
        return max(claimed_at, self._renewed_at) + self.options.claim_lease_s - self.clock()

    async def _send(self, batch: list[QueuedEvent], claimed_at: float) -> None:
        """Send a batch in one call of the sink, or, if it asked (``call_per_account``), one
        per account (and test event code), all at once: each call's outcomes are recorded,
        and its waiting requests answered, as soon as it returns, whatever becomes of the
        others (one that raises or is slow costs them nothing)."""
        try:
            async with self._slots:
                if self._lease_left(claimed_at) < _LEASE_MARGIN_S:
                    # This process stalled (a paused VM, a blocked loop) past its lease: another
                    # may have the batch by now, so it is not sent from here. Unrecorded, its
                    # claims lapse and whoever holds them sends it.
                    log.warning("delivery_lease_lapsed", sink=self.sink, events=len(batch))
                    return
                # A sink that asked for it (Meta: what one request can carry) gets one call
                # per account and test event code; any other, its batch whole.
                per_account = self.options.call_per_account
                groups: dict[tuple[str, str | None], list[QueuedEvent]] = {}
                for item in batch:
                    key = (item.account_id, item.test_event_code) if per_account else ("", None)
                    groups.setdefault(key, []).append(item)
                if len(groups) == 1:
                    # The common case, one account or one call: no task to schedule.
                    await self._send_group(batch)
                    return
                # Each group is awaited to its end: none is left sending once the slot is free.
                done = await asyncio.gather(
                    *(self._send_group(group) for group in groups.values()),
                    return_exceptions=True,
                )
                for fault in done:
                    if isinstance(fault, BaseException):
                        log.error("dispatcher_group_error", sink=self.sink, exc_info=fault)
        finally:
            self._in_flight.difference_update(item.pk for item in batch)
            self._wake.set()

    async def _send_group(self, group: list[QueuedEvent]) -> None:
        """Send one call's events of a batch, record their outcomes and act on them."""
        try:
            sent = await self._send_and_record(group)
        finally:
            self._in_flight.difference_update(item.pk for item in group)
            self._wake.set()
        if sent is None:
            return
        results, held = sent
        for account, until in held.items():
            try:
                await self.outbox.defer(self.sink, [account], until)
            except Exception:
                # The outcomes are recorded; the hold is a courtesy to the destination.
                log.exception("dispatcher_defer_failed", sink=self.sink, account=account)
        accounts = {item.pk: item.account_id for item in group}
        for result in results:
            outcome = "retry" if result.state.status == "pending" else result.state.status
            self.metrics.events_outcome.labels(accounts[result.pk], self.sink, outcome).inc()
            self._settle(result.pk, result.state)
        self._report(group, results)

    async def _send_and_record(
        self, group: list[QueuedEvent]
    ) -> tuple[list[AttemptResult], dict[str, float]] | None:
        """Send one group of a batch and store its outcomes; None if there are none to act
        on."""
        try:
            results, held = await self._round(group)
        except Exception:
            log.exception("dispatcher_batch_error", sink=self.sink, events=len(group))
            # Hold the group back a while: a fault that repeats must not become a busy loop.
            # (Nothing was sent, or the sink said nothing: there is no outcome to keep.)
            await self._hold(group, _internal_error_state)
            return None
        try:
            lost = await self._record(results)
        except Exception:
            # The store refused the outcomes for as long as the tries last, or the dispatcher
            # stopped meanwhile: the group is held back as an internal error (it will be sent
            # again: the window of a store that fails during a send; see the README) rather
            # than keeping its slot and claims for ever.
            log.exception("dispatcher_record_failed", sink=self.sink, events=len(group))
            await self._hold(group, _internal_error_state)
            return None
        if lost:
            log.warning(
                "delivery_claim_lost",
                sink=self.sink,
                events=lost,
                reason="their claims expired in flight and another process took them;"
                " they may have been sent twice",
                fix="raise the sink's claim_lease_s, or find what stalled this process",
            )
        return results, held

    async def _record(self, results: list[AttemptResult]) -> int:
        """Store a batch's outcomes, trying again while the store refuses: what the sink did
        is known, and holding the batch instead would send what was delivered again. The
        claims stay in flight meanwhile, so they are renewed; the tries stop when the
        dispatcher does, or after ``_RECORD_TRIES_S``."""
        pause = _RECORD_FIRST_PAUSE_S
        give_up = self.clock() + max(_RECORD_TRIES_S, self.options.claim_lease_s)
        while True:
            try:
                return await self.outbox.record(self.sink, results, owner=self.owner)
            except Exception:
                if self._stopping or self.clock() >= give_up:
                    raise
                log.warning(
                    "dispatcher_record_retry",
                    sink=self.sink,
                    events=len(results),
                    retry_in_s=pause,
                    exc_info=True,
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, self.options.claim_lease_s / 3)

    def _report(self, batch: list[QueuedEvent], results: list[AttemptResult]) -> None:
        """Log, once, every outcome a person must act on: ids, the code and the fix."""
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

    async def _hold(
        self, batch: list[QueuedEvent], state_for: Callable[[QueuedEvent], SinkState]
    ) -> None:
        until = self.clock() + self.options.retry_cap_s
        held = [
            AttemptResult(pk=item.pk, state=state_for(item), next_attempt_at=until)
            for item in batch
        ]
        try:
            await self.outbox.record(self.sink, held, owner=self.owner)
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
        self, batch: list[QueuedEvent]
    ) -> tuple[list[AttemptResult], dict[str, float]]:
        """Send what is still fresh; return each event's result and the accounts to hold."""
        now = self.clock()
        results: list[AttemptResult] = []
        fresh: list[QueuedEvent] = []
        for item in batch:
            if now - item.event_time > self.options.max_age_s:
                results.append(_final(item, "expired", self._too_old(), "expired", 0))
            elif (until := self._holds.get(item.account_id, 0.0)) > now:
                results.append(self._held_back(item, until))
            else:
                fresh.append(item)
        if not fresh:
            return results, {}
        started = self.clock()
        try:
            async with asyncio.timeout(self.send_timeout_s):
                outcomes = await self._call(fresh)
        except (Exception, asyncio.CancelledError) as exc:
            if not is_plugin_fault(exc):
                raise  # shutdown: the batch stays pending, as it was
            results.extend(self._faulted(fresh, exc, now, started))
            return results, {}
        held: dict[str, float] = {}
        for item, outcome in zip(fresh, outcomes, strict=True):
            try:
                result = self._result(item, outcome, len(fresh))
            except Exception:
                # One outcome the gateway cannot work out must not cost the others theirs
                # (holding the whole batch would send the delivered ones again).
                log.exception("dispatcher_outcome_error", sink=self.sink, event_pk=item.pk)
                result = AttemptResult(
                    pk=item.pk,
                    state=_internal_error_state(item),
                    next_attempt_at=self.clock() + self.options.retry_cap_s,
                )
            results.append(result)
            if outcome.hold_account and result.next_attempt_at is not None:
                held[item.account_id] = max(held.get(item.account_id, 0.0), result.next_attempt_at)
        for account, until in held.items():
            self._holds[account] = max(self._holds.get(account, 0.0), until)
        return results, held

    def _held_back(self, item: QueuedEvent, until: float) -> AttemptResult:
        """Not sent: its account is held (the sink was throttled); due again when that ends."""
        return AttemptResult(
            pk=item.pk,
            state=SinkState(
                status="pending",
                attempts=item.attempts,
                error=f"will retry: the {self.sink} sink asked to hold this account's deliveries"
                " for a while (throttled); not sent yet",
                error_code="account_held",
            ),
            next_attempt_at=until,
        )

    def _faulted(
        self, fresh: list[QueuedEvent], exc: BaseException, now: float, started: float
    ) -> list[AttemptResult]:
        """The sink's own fault (or a hang): logged once, with its traceback; the call's events
        are held back for ``retry_cap_s``."""
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        log.error(
            "sink_failed",
            sink=self.sink,
            hook="gateway_send_events",
            events=len(fresh),
            event_ids=[item.event_id[:64] for item in fresh[:_LOGGED_IDS]],
            exc_info=exc,
        )
        until = self.clock() + self.options.retry_cap_s
        error = (
            f"will retry: the {self.sink} sink failed in gateway_send_events ({reason});"
            " see the gateway log"
        )
        duration = round((self.clock() - started) * 1000, 3)
        return [
            AttemptResult(
                pk=item.pk,
                state=SinkState(
                    status="pending",
                    attempts=item.attempts + 1,
                    error=error,
                    error_code="sink_error",
                ),
                attempts=[
                    Attempt(
                        sink=self.sink,
                        attempt=item.attempts + 1,
                        at=now,
                        outcome="retry",
                        error_code="sink_error",
                        message=error,
                        batch_size=len(fresh),
                        duration_ms=duration,
                    )
                ],
                next_attempt_at=until,
            )
            for item in fresh
        ]

    async def _call(self, fresh: list[QueuedEvent]) -> list[SendOutcome]:
        outcomes = await self.send(fresh)
        if not isinstance(outcomes, list) or len(outcomes) != len(fresh):
            got = len(outcomes) if isinstance(outcomes, list) else type(outcomes).__name__
            raise TypeError(f"gateway_send_events returned {got} outcomes for {len(fresh)} events")
        for outcome in outcomes:
            if not isinstance(outcome, SendOutcome):
                raise TypeError(f"gateway_send_events returned a {type(outcome).__name__}")
        return outcomes

    def _result(self, item: QueuedEvent, outcome: SendOutcome, batch_size: int) -> AttemptResult:
        now = self.clock()
        attempts = item.attempts + max(1, outcome.tries)
        tried = Attempt(
            sink=self.sink,
            attempt=attempts,
            at=now,
            outcome=outcome.status,
            http_status=outcome.http_status,
            error_code=outcome.code,
            message=None if outcome.reason is None else _storable(outcome.reason),
            trace_id=outcome.trace_id,
            batch_size=batch_size,
            duration_ms=outcome.duration_ms,
        )
        if outcome.status == "delivered":
            state = SinkState(
                status="delivered",
                attempts=attempts,
                trace_id=outcome.trace_id,
                events_received=1,
                warnings=outcome.warnings or None,
            )
            return AttemptResult(pk=item.pk, state=state, attempts=[tried])
        # A sink's own words reach logs, the store and API callers: no personal data in them.
        reason = _storable(outcome.reason or f"the {self.sink} sink gave no reason")
        if outcome.status == "failed":
            return _final(item, "failed", reason, outcome.code or "failed", attempts, tried)
        o = self.options
        # The exponent is bounded: past ~1,000 attempts 2**n no longer fits a float.
        delay = min(o.retry_cap_s, o.retry_base_s * 2.0 ** min(attempts - 1, 64))
        delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security
        delay = max(delay, outcome.retry_after_s or 0.0)
        when = now + delay
        if when - item.event_time > o.max_age_s:
            return _final(item, "expired", self._too_old(), outcome.code, attempts, tried)
        state = SinkState(
            status="pending",
            attempts=attempts,
            error=f"will retry: {reason}",
            error_code=outcome.code,
            trace_id=outcome.trace_id,
        )
        return AttemptResult(pk=item.pk, state=state, attempts=[tried], next_attempt_at=when)

    def _too_old(self) -> str:
        days = self.options.max_age_s / 86400
        return (
            f"expired: older than {days:g} days before the {self.sink} sink could deliver it;"
            " the destination would reject it"
        )


def _storable(text: str) -> str:
    """A sink's words as every store keeps them: personal data masked, and no lone surrogate
    or NUL (neither SQLite's UTF-8 nor PostgreSQL's text takes one)."""
    return scrub(text).encode("utf-8", "replace").decode("utf-8").replace("\x00", "")


def _final(
    item: QueuedEvent,
    status: str,
    error: str,
    code: str | None,
    attempts: int,
    tried: Attempt | None = None,
) -> AttemptResult:
    return AttemptResult(
        pk=item.pk,
        state=SinkState(
            status=status,  # type: ignore[arg-type]
            attempts=max(attempts, item.attempts),
            error=error,
            error_code=code or status,
            trace_id=tried.trace_id if tried else None,
        ),
        attempts=[tried] if tried else [],
    )


def _internal_error_state(item: QueuedEvent) -> SinkState:
    return SinkState(
        status="pending",
        attempts=item.attempts,
        error="will retry: internal error while sending (see the gateway log)",
        error_code="internal",
    )


# The first wait before storing a batch's outcomes again (it doubles, up to a third of the
# claim lease, so renewals keep the claims meanwhile).
_RECORD_FIRST_PAUSE_S = 0.1
# How long outcomes are offered to a store that refuses them (a lock, a failover) before the
# batch is held back instead: a refusal that lasts (a value the store cannot hold) must not
# keep the batch's slot and claims.
_RECORD_TRIES_S = 30.0
# A batch is not sent with less of its lease left than this.
_LEASE_MARGIN_S = 0.5
# A delivery still retrying after this many attempts is worth a look (once each).
_RETRY_ALERTS = frozenset({3, 10, 30})
_LOGGED_IDS = 20
