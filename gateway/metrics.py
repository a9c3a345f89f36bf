"""Prometheus metrics, on a registry of the app's own (no process-global default registry).

Counters and histograms move as things happen; the outbox gauges and the events-by-status
gauge are read from the store when ``/metrics`` is scraped, so they are right after a restart.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["Metrics"]

_COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0)
# A busy loop is a few ms late (the turn it is serving); a stall, the whole stall.
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric the gateway exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        # Every request moves these, and an event per sink the next: plain tallies, read when
        # /metrics is scraped (prometheus_client's children take a lock per move).
        self.requests = RequestTally(
            "ctwa_http_requests", "HTTP requests by route and status.",
            "ctwa_http_request_duration_seconds", "HTTP request latency by route.",
            _LATENCY_BUCKETS,
        )  # fmt: skip
        r.register(self.requests)
        self.events_accepted = Tally(
            "ctwa_events_accepted", "Conversion events accepted (stored).", ("account", "sink")
        )
        r.register(self.events_accepted)
        self.events_duplicate = Counter(
            "ctwa_events_duplicate", "Conversion requests answered from a stored eventId.",
            ["account"], registry=r,
        )  # fmt: skip
        self.events_outcome = Counter(
            "ctwa_events_outcome",
            "Delivery outcomes recorded (delivered, failed, expired, retry).",
            ["account", "sink", "outcome"], registry=r,
        )  # fmt: skip
        self.events_by_status = Gauge(
            "ctwa_events_stored", "Stored events by sink and delivery status.",
            ["account", "sink", "status"], registry=r,
        )  # fmt: skip
        self.outbox_depth = Gauge(
            "ctwa_outbox_pending", "Deliveries waiting to be sent, by sink.", ["sink"],
            registry=r,
        )  # fmt: skip
        self.outbox_oldest = Gauge(
            "ctwa_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending delivery, by sink (0 when none).", ["sink"], registry=r,
        )  # fmt: skip
        self.meta_seconds = Histogram(
            "ctwa_meta_request_duration_seconds", "Graph API request latency by outcome.",
            ["kind"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.meta_errors = Counter(
            "ctwa_meta_errors", "Graph API errors by code (code/subcode, or transport).",
            ["code"], registry=r,
        )  # fmt: skip
        self.webhook_messages = Counter(
            "ctwa_webhook_messages", "Inbound messages processed (new, not duplicates).",
            registry=r,
        )  # fmt: skip
        self.webhook_clicks = Counter(
            "ctwa_webhook_clicks_captured", "Click ids captured (from messages or recovered).",
            registry=r,
        )  # fmt: skip
        self.webhook_unprocessed = Counter(
            "ctwa_webhook_unprocessed",
            "Parts of signed notifications not processed (archived; see `webhooks list`).",
            ["code"], registry=r,
        )  # fmt: skip
        self.webhook_archive_open = Gauge(
            "ctwa_webhook_archive_open",
            "Archived notifications not fully processed, by status (partial, pending).",
            ["status"], registry=r,
        )  # fmt: skip
        self.webhook_signature_failures = Counter(
            "ctwa_webhook_signature_failures", "Notifications refused for their signature.",
            registry=r,
        )  # fmt: skip
        self.webhook_bodies_refused = Counter(
            "ctwa_webhook_bodies_refused",
            "Notifications refused unread: [webhook] max_bytes_in_flight were being received.",
            registry=r,
        )  # fmt: skip
        self.auth_failures_limited = Counter(
            "ctwa_auth_failures_limited",
            "Client addresses cut off for too many failed authentications (401s, 403s).",
            registry=r,
        )  # fmt: skip
        self.store_commit_seconds = Histogram(
            "ctwa_store_commit_seconds",
            "Time from a group commit's first statement to its COMMIT returning (one fsync).",
            buckets=_COMMIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.store_writes_per_commit = Histogram(
            "ctwa_store_writes_per_commit", "Writes (conversions, captures...) per group commit.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r,
        )  # fmt: skip
        self.event_loop_lag = Histogram(
            "ctwa_event_loop_lag_seconds",
            "How late the event loop ran a timer set every 100 ms (gateway.loop_watch).",
            buckets=_LAG_BUCKETS, registry=r,
        )  # fmt: skip
        self.store_lookups = Gauge(
            "ctwa_store_lookups",
            "Conversation lookups since start, answered from memory (hit) or the store (miss).",
            ["result"], registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "ctwa_rate_limited", "Requests refused by the per-key rate limit.", ["key"],
            registry=r,
        )  # fmt: skip

    def child(self, metric: Any, *labels: str) -> Any:
        """Return ``metric.labels(*labels)``, remembered: prometheus_client validates the
        labels and takes a lock on every ``labels()`` call, several times a request."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_commit(self, seconds: float, writes: int) -> None:
        """Record one group commit (the store's writer calls this on the loop)."""
        self.store_commit_seconds.observe(seconds)
        self.store_writes_per_commit.observe(writes)

    def render(self) -> bytes:
        """Return the Prometheus text exposition."""
        return generate_latest(self.registry)


class Tally(Collector):
    """A counter by labels kept as a plain dict on the event loop's thread, exported as a
    Prometheus counter when scraped."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self.counts: dict[tuple[str, ...], int] = {}

    def inc(self, *labels: str) -> None:
        """Count one for these label values."""
        counts = self.counts
        counts[labels] = counts.get(labels, 0) + 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        for labels, count in dict(self.counts).items():  # a copy: scrapes may run elsewhere
            family.add_metric(list(labels), count)
        yield family


class RequestTally(Collector):
    """HTTP requests by route and status, and their latency by route: the counter and the
    histogram every request moves, kept as plain dicts and lists, exported when scraped."""

    def __init__(
        self,
        name: str,
        documentation: str,
        latency_name: str,
        latency_documentation: str,
        buckets: Sequence[float],
    ) -> None:
        self._count = Tally(name, documentation, ("route", "status"))
        self._latency_name = latency_name
        self._latency_documentation = latency_documentation
        self._bounds = list(buckets)
        self._bound_labels = [*map(floatToGoString, buckets), "+Inf"]
        # route -> [count per bucket (the last one +Inf)..., sum of seconds]
        self._latency: dict[str, list[float]] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one request and its latency."""
        self._count.inc(route, _STATUS.get(status) or str(status))
        row = self._latency.get(route)
        if row is None:
            row = self._latency[route] = [0.0] * (len(self._bounds) + 2)
        row[bisect.bisect_left(self._bounds, seconds)] += 1
        row[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        yield from self._count.collect()
        family = HistogramMetricFamily(
            self._latency_name, self._latency_documentation, labels=["route"]
        )
        for route, row in dict(self._latency).items():
            counts, total, cumulative = row[:-1], row[-1], 0.0
            buckets = []
            for bound, count in zip(self._bound_labels, counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([route], buckets, total)
        yield family


# The statuses a gateway answers with, as label values made once.
_STATUS = {code: str(code) for code in range(100, 600)}
