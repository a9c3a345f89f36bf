"""One outbox batch to Meta: grouped by request, one bad event split out, each outcome classified.

The host's outbox hands over up to ``batch_max`` due events; they go to Meta in one request per
(dataset, token, test event code), since ``test_event_code`` is request-level at Meta. Each
Graph reply becomes a :class:`gateway.SendOutcome` per event (META.md §2):

- ``ok``: delivered, with Meta's ``fbtrace_id`` and any warning ``messages``;
- a whole-request rejection one bad event can explain (code 100) is split in halves until the
  bad events are alone; they fail with Meta's reason and the good ones go through. Meta rejects
  the whole request in that case, so nothing is sent twice. A request refused as too large
  (HTTP 413, a proxy's body limit) is split the same way; an event refused alone is retried,
  its reason saying to raise that limit;
- a 4xx that is not JSON is not the Graph API's (a proxy, a wrong ``graph_url``): retried, and
  its likely cause logged once per dataset (``meta_not_graph_api``);
- ``transient``: retry; ``throttled``: retry no sooner than Meta's ``Retry-After`` and hold the
  account's other deliveries as long;
- ``permanent``: failed, with what to fix.

Splitting takes requests one after another, so a batch has a time budget: once it is spent no
new request starts, and the events not yet sent on their own come back as ``retry`` (Meta
rejected every request they were in, so nothing of theirs was taken). Outcomes of requests
that completed are always returned: an event Meta took is never sent again for lack of time.
Likewise, once Meta throttles one of a split's requests no further one starts: the events not
yet sent come back as throttled (``hold_account``, Meta's ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from msgspec.structs import replace

from gateway import Metrics, QueuedEvent, SendOutcome
from plugins.meta_capi.body import meta_request_body
from plugins.meta_capi.graph import GraphClient, GraphReply, explain

__all__ = ["GraphSender", "Route"]

log = structlog.get_logger()


@dataclass(frozen=True)
class Route:
    """Where an account's events go: its dataset and token."""

    dataset_id: str
    token: str


@dataclass
class _Requests:
    """The requests one group of a batch takes (more than one when it is split)."""

    route: Route
    # The request-level test_event_code they carry.
    code: str | None
    # No request starts after this (time.monotonic()).
    deadline: float
    # Requests each event was in so far.
    tries: dict[int, int] = field(default_factory=dict)
    # Meta's answer when it throttled one of them: no further request is sent.
    throttled: GraphReply | None = None
    # Why they were split: Meta refused an event of theirs, or a request was too large.
    refused: bool = False
    too_large: bool = False

    def why_split(self) -> str:
        """Say why the events of a split were in requests that took none of them."""
        if self.too_large and not self.refused:
            return "the batch they were in was refused as too large (HTTP 413)"
        if self.too_large:
            return (
                "the batches they were in were refused, as too large (HTTP 413) and by Meta"
                " for an event it refused"
            )
        return "Meta rejected the batch they were in for an event it refused"


class GraphSender:
    """Sends outbox batches through one Graph client; ``routes`` may change between batches."""

    def __init__(
        self,
        graph: GraphClient,
        *,
        sink: str,
        routes: dict[str, Route],
        partner_agent: str,
        forced_test_event_code: str | None,
        throttle_floor_s: float,
        metrics: Metrics,
        budget_s: float,
    ) -> None:
        self.graph = graph
        self.sink = sink
        self.routes = routes
        self.partner_agent = partner_agent
        self.forced_test_event_code = forced_test_event_code
        # A throttled dataset waits at least this long, whatever Retry-After says.
        self.throttle_floor_s = throttle_floor_s
        self.metrics = metrics
        # No request starts later than this after the batch began (see the module's doc).
        self.budget_s = budget_s
        # The (dataset, HTTP status) of 4xx answers not from the Graph API, logged once each.
        self._told: set[tuple[str, int | None]] = set()

    async def send(self, events: list[QueuedEvent]) -> list[SendOutcome]:
        """Return one outcome per event, in order."""
        outcomes: dict[int, SendOutcome] = {}
        groups: dict[tuple[Route, str | None], list[QueuedEvent]] = {}
        for event in events:
            route = self.routes.get(event.account_id)
            if route is None:
                # Accepted while the account had a dataset, which config no longer gives it.
                outcomes[event.pk] = SendOutcome(
                    status="failed",
                    reason=f"account {event.account_id!r} has no dataset or token now: fix its"
                    " [[accounts]] entry, then run `ctwa-gateway replay`",
                    code="no_route",
                    tries=0,
                )
                continue
            code = self.forced_test_event_code or event.test_event_code
            groups.setdefault((route, code), []).append(event)
        deadline = time.monotonic() + self.budget_s
        if len(groups) == 1:
            # The common case, one account: no task to schedule.
            (((route, code), group),) = groups.items()
            outcomes.update(await self._attempt(_Requests(route, code, deadline), group))
        else:
            sent = await asyncio.gather(
                *(
                    self._attempt(_Requests(route, code, deadline), group)
                    for (route, code), group in groups.items()
                )
            )
            for found in sent:
                outcomes.update(found)
        return [outcomes[event.pk] for event in events]

    async def _attempt(
        self, requests: _Requests, events: Sequence[QueuedEvent]
    ) -> dict[int, SendOutcome]:
        if requests.throttled is not None:
            # Meta throttled an earlier request of this split: the rest wait with the account.
            return self._not_sent(requests, requests.throttled, events)
        if time.monotonic() >= requests.deadline:
            # Out of time while splitting: these were only ever in requests Meta rejected.
            later = SendOutcome(
                status="retry",
                reason=f"not sent yet: {requests.why_split()}, and splitting it took longer"
                " than one attempt may; the next attempt goes on",
                code="split_unfinished",
            )
            return {
                event.pk: replace(later, tries=requests.tries.get(event.pk, 0)) for event in events
            }
        route, code, tries = requests.route, requests.code, requests.tries
        body = meta_request_body(
            [event.event for event in events],
            partner_agent=self.partner_agent,
            test_event_code=code,
        )
        reply = await self.graph.send_events(route.dataset_id, route.token, body)
        self.metrics.meta_seconds.labels(reply.kind).observe(reply.duration_ms / 1000)
        if reply.kind != "ok":
            self.metrics.meta_errors.labels(reply.error_code()).inc()
        for event in events:
            tries[event.pk] = tries.get(event.pk, 0) + 1
        if reply.is_not_graph_api():
            self._not_graph_api(route, reply)
        if len(events) > 1 and (reply.is_event_level() or reply.is_too_large()):
            requests.too_large |= reply.is_too_large()
            requests.refused |= not reply.is_too_large()
            half = len(events) // 2
            left = await self._attempt(requests, events[:half])
            right = await self._attempt(requests, events[half:])
            return left | right
        if reply.is_too_large() and reply.is_not_graph_api():
            # One event alone, where a split ends: no batch_max makes it smaller. Retried,
            # as any answer not from the Graph API (raising the limit delivers it).
            (event,) = events
            alone = _outcome(reply, tries[event.pk], [], self.throttle_floor_s)
            return {event.pk: replace(alone, reason=_TOO_LARGE_ALONE)}
        if reply.kind == "throttled":
            requests.throttled = reply
            log.warning(
                "meta_throttled",
                sink=self.sink,
                dataset_id=route.dataset_id,
                code=reply.error_code(),
                retry_after_s=reply.retry_after,
            )
        warnings = self._warnings(reply, len(events))
        # One outcome per number of tries (events split out of a batch took more), shared.
        made: dict[int, SendOutcome] = {}
        found = {}
        for event in events:
            n = tries[event.pk]
            if n not in made:
                made[n] = _outcome(reply, n, warnings, self.throttle_floor_s)
            found[event.pk] = made[n]
        return found

    def _not_sent(
        self, requests: _Requests, throttled: GraphReply, events: Sequence[QueuedEvent]
    ) -> dict[int, SendOutcome]:
        """The events a split did not send after Meta throttled it: held with the account,
        for as long as the throttled request's outcome says."""
        held = replace(
            _outcome(throttled, 0, [], self.throttle_floor_s),
            reason=f"not sent yet: {requests.why_split()}, then Meta throttled the account"
            f" while the gateway split it ({explain(throttled)}); the next attempt goes on",
            http_status=None,
            trace_id=None,
            duration_ms=0.0,
        )
        return {event.pk: replace(held, tries=requests.tries.get(event.pk, 0)) for event in events}

    def _not_graph_api(self, route: Route, reply: GraphReply) -> None:
        """Name, once per dataset and status, the likely cause of a 4xx that is not the Graph
        API's: its events are retried (fixing the cause delivers them) until they expire."""
        told = (route.dataset_id, reply.http_status)
        if told in self._told:
            return
        self._told.add(told)
        log.warning(
            "meta_not_graph_api",
            sink=self.sink,
            dataset_id=route.dataset_id,
            http_status=reply.http_status,
            reason=explain(reply),
        )

    def _warnings(self, reply: GraphReply, sent: int) -> list[str]:
        warnings = list(reply.warnings)
        if reply.kind == "ok" and reply.events_received not in (None, sent):
            # Meta does not say which ones; resending could count some twice, so keep the
            # discrepancy with every event instead.
            warnings.append(f"events_received {reply.events_received} of {sent} sent")
            log.warning(
                "meta_count_mismatch",
                sink=self.sink,
                sent=sent,
                received=reply.events_received,
                trace_id=reply.trace_id,
            )
        return warnings


_TOO_LARGE_ALONE = (
    "something between the gateway and Meta (a proxy's body limit) refused this event as too"
    " large even alone (HTTP 413, not a Graph API answer): raise that limit"
)


def _outcome(
    reply: GraphReply, tries: int, warnings: list[str], throttle_floor_s: float
) -> SendOutcome:
    delivered = SendOutcome(
        status="delivered",
        trace_id=reply.trace_id,
        http_status=reply.http_status,
        tries=tries,
        duration_ms=reply.duration_ms,
        warnings=warnings or None,
    )
    if reply.kind == "ok" and reply.events_received == 0:
        # A 200 that kept nothing (an event Meta judged to be in the future, say): the events
        # were not received, and saying "delivered" would hide it. Meta's warnings say why.
        said = "; ".join(w for w in warnings if not w.startswith("events_received ")) or (
            "it gave no reason"
        )
        return replace(
            delivered,
            status="failed",
            reason=f"Meta answered 200 but kept none of the events it was sent: {said}. Fix"
            " what it names, then replay the event.",
            code="meta_kept_none",
            warnings=None,
        )
    if reply.kind == "ok":
        return delivered
    reason, code = explain(reply), reply.error_code()
    if reply.kind == "permanent":
        return replace(delivered, status="failed", reason=reason, code=code, warnings=None)
    throttled = reply.kind == "throttled"
    return replace(
        delivered,
        status="retry",
        reason=reason,
        code=code,
        warnings=None,
        retry_after_s=max(reply.retry_after or 0.0, throttle_floor_s) if throttled else None,
        hold_account=throttled,
    )
