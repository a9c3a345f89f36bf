"""Is the gateway's p99 in the last minute of a long run what it was in the first?

Issue 14: p99 flat (first minute vs last minute within 20%, baseline probes in the same
minutes to separate the machine's noise) over a 10-minute soak with the Meta sink pointed at
the local fake.

The set-up is bench.ingest's: ``wrk -t1`` on one core, the gateway (every thread) and the
minimal aiohttp handler pinned to the other; the shipped config.toml, here with the
``meta_capi`` sink delivering to bench.fake_graph_server; a click captured through the signed
webhook, then Purchases by ``phoneE164``, each with a fresh ``eventId``.

The run is a chain of slices: ``--slice`` seconds of load on the gateway, then a ``--probe``
of the same load on the baseline. A machine that slows down (a neighbour, a throttled CPU)
slows both, so the gateway's first-to-last change divided by the baseline's is the gateway's
own. Between the two, /metrics is scraped for the outbox depth left when the load stops, the
delivered count and the event loop's lateness (``ctwa_event_loop_lag_seconds``: a stall of
the gateway's own shows there, a slow machine's in the probes), and the gateway's RSS read
from /proc. Per minute the p99 is that of all the minute's requests (pooled from each slice's
distribution), not a median of the slices' p99s: a stall once a minute is what a soak is for.

    python -m bench.soak [--minutes 10] [--slice 10] [--probe 2] [--connections 64]

A run under two minutes compares its first half with its last (a quick check, not the goal).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.ingest import HEADERS, PATH, PHONE, TEMPLATE
from bench.load import free_port, python, server
from bench.pinned import LOAD_CPU, WrkResult, can_pin, lua_script, pin, pooled_percentile, wrk
from bench.target import ENV, Buckets, capture, histogram, metrics, shipped_config

SINK = "meta_capi"
GOAL = 0.20  # the "within 20%"
_PENDING = re.compile(rf'^ctwa_outbox_pending\{{sink="{SINK}"\}} (\S+)$', re.M)
# Label order is prometheus_client's business: match the two that matter wherever they are.
_DELIVERED = re.compile(
    rf'^ctwa_events_outcome_total\{{(?=[^}}]*outcome="delivered")(?=[^}}]*sink="{SINK}")'
    r"[^}]*\} (\S+)$",
    re.M,
)


@dataclass(frozen=True)
class Reading:
    """The gateway at one moment: /proc for its memory, /metrics for its outbox."""

    at: float  # seconds since the soak began
    rss_mb: float
    outbox: float
    delivered: float
    scrape_ms: float
    # The event loop's lateness so far: (upper bound in seconds, cumulative count) per bucket.
    lag: Buckets = ()


@dataclass(frozen=True)
class Slice:
    started: float  # seconds since the soak began
    ended: float
    gateway: WrkResult
    baseline: WrkResult
    reading: Reading

    @property
    def errors(self) -> int:
        return sum(r.non_2xx + r.socket_errors for r in (self.gateway, self.baseline))


@dataclass(frozen=True)
class Window:
    """About a minute of a run (in a short run, its half): consecutive slices."""

    slices: list[Slice]
    delivered_before: Reading  # the last reading of the previous window

    @property
    def label(self) -> str:
        first, last = self.slices[0], self.slices[-1]
        return f"{_clock(first.started)}-{_clock(last.ended)}"

    def p99(self, side: str) -> float:
        runs = [s.gateway if side == "gateway" else s.baseline for s in self.slices]
        return pooled_percentile(runs, 99)

    @property
    def rate(self) -> float:
        return sum(s.gateway.requests for s in self.slices) / sum(
            s.gateway.seconds for s in self.slices
        )

    @property
    def delivered_rate(self) -> float:
        """Events delivered per second of gateway load: comparable with its req/s."""
        delivered = self.slices[-1].reading.delivered - self.delivered_before.delivered
        return delivered / sum(s.gateway.seconds for s in self.slices)

    @property
    def probe_range(self) -> str:
        """The lowest and highest p99 of the window's baseline probes: how steady it was."""
        p99s = [s.baseline.p99_ms for s in self.slices]
        return f"{min(p99s):.1f}-{max(p99s):.1f}"

    @property
    def rss_mb(self) -> float:
        return max(s.reading.rss_mb for s in self.slices)

    @property
    def outbox(self) -> float:
        return max(s.reading.outbox for s in self.slices)

    @property
    def loop_lag_ms(self) -> float:
        """The bound (ms) under which the event loop was late all the window: a stall of the
        gateway's own shows here; a slow machine's shows in the baseline probes too."""
        before = dict(self.delivered_before.lag)
        after = self.slices[-1].reading.lag
        if not after:
            return math.nan  # a gateway without the metric
        total = after[-1][1] - before.get(after[-1][0], 0.0)  # the +Inf bucket: every turn
        return next(b for b, count in after if count - before.get(b, 0.0) >= total) * 1000


@dataclass(frozen=True)
class Gateway:
    """How to read the running gateway's figures."""

    pid: int
    url: str
    began: float  # time.monotonic() when the soak began

    def read(self) -> Reading:
        """Scrape /metrics and read the RSS."""
        started = time.monotonic()
        text = metrics(self.url)
        scraped = time.monotonic()
        pending = _PENDING.search(text)
        return Reading(
            at=scraped - self.began,
            rss_mb=rss_mb(self.pid),
            outbox=float(pending.group(1)) if pending else 0.0,
            delivered=sum(float(found) for found in _DELIVERED.findall(text)),
            scrape_ms=(scraped - started) * 1000,
            lag=histogram(text, "ctwa_event_loop_lag_seconds"),
        )

    def drained(self, timeout: float) -> float | None:
        """Seconds until the outbox is empty, or None if it is not within ``timeout``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.read().outbox == 0:
                return time.monotonic() - started
            time.sleep(0.1)
        return None


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fake_stats(port: int) -> tuple[int, int]:
    """(distinct events the fake Graph API received, events it received twice)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=30) as answer:
        stats = json.loads(answer.read())
    return int(stats["received"]), int(stats["repeats"])


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def windows(slices: list[Slice], start: Reading, minutes: float) -> list[Window]:
    """Cut the slices into the run's minutes (halves under two minutes), equal in count.

    By count rather than by clock: slices do not end on minute boundaries, and a last
    "minute" holding one slice would compare a few seconds with a whole minute.
    """
    count = min(len(slices), max(2, round(minutes)))
    found: list[Window] = []
    before = start
    for i in range(count):
        part = slices[i * len(slices) // count : (i + 1) * len(slices) // count]
        found.append(Window(part, before))
        before = part[-1].reading
    return found


@dataclass(frozen=True)
class Soak:
    slices: list[Slice]
    start: Reading  # after the warm-up
    drain_s: float | None
    received: int  # by the fake, during the soak
    repeats: int


def soak(args: argparse.Namespace, folder: Path) -> Soak:
    graph_port, base_port, port = free_port(), free_port(), free_port()
    config = shipped_config(
        folder,
        port,
        plugins={"sinks": [SINK], SINK: {"graph_url": f"http://127.0.0.1:{graph_port}"}},
    )
    fake_argv = [python(), "-m", "bench.fake_graph_server", str(graph_port)]
    base_argv = [python(), "-m", "bench.baseline_server", str(base_port)]
    gateway_argv = [python(), "-m", "gateway", "serve", "--config", str(config)]
    # The token config.toml's demo account names; the fake accepts any.
    gateway_env = {**ENV, "CTWA_DEMO_ACCESS_TOKEN": "bench-soak-token"}
    run = int(time.time())
    with (
        server(fake_argv, graph_port, {}, folder / "graph.log") as fake,
        server(base_argv, base_port, {}, folder / "baseline.log") as base,
        server(gateway_argv, port, gateway_env, folder / "gateway.log") as proc,
    ):
        pin(proc.pid)
        pin(base.pid)
        # The fake stands for Meta, which is not on the gateway's machine: keep it off the
        # server core, beside wrk; it answers a few batches a second.
        pin(fake.pid, LOAD_CPU)
        capture(port, PHONE)
        urls = {"gateway": f"http://127.0.0.1:{port}", "baseline": f"http://127.0.0.1:{base_port}"}

        def load(side: str, seconds: float, prefix: str) -> WrkResult:
            script = lua_script(PATH, HEADERS, TEMPLATE, prefix)
            return wrk(urls[side], script, connections=args.connections, seconds=seconds)

        # Warm-up (connections, caches, the store's first pages, the fake's session): not
        # counted, or the first minute would be slow for reasons a soak is not about.
        load("gateway", args.warmup, f"soak{run}-warm")
        load("baseline", min(args.warmup, args.probe), f"soak{run}-warm")
        gateway = Gateway(proc.pid, urls["gateway"], time.monotonic())
        start = gateway.read()
        received_before, repeats_before = fake_stats(graph_port)
        slices: list[Slice] = []
        cost = args.slice + args.probe + 1.0  # a guess until a slice has been timed
        while len(slices) < 2 or time.monotonic() - gateway.began + cost <= args.minutes * 60:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited: {(folder / 'gateway.log').read_text()}")
            started = time.monotonic()
            prefix = f"soak{run}-{len(slices)}"
            on_gateway = load("gateway", args.slice, prefix)
            # Between the loads, not during them: /metrics counts every stored delivery by
            # status, work that grows with the store, and a p99 that grew with it would be the
            # scraper's, not the conversions'. Its own duration is reported instead.
            reading = gateway.read()
            # Right after the gateway's slice, so in the same minute.
            on_baseline = load("baseline", args.probe, prefix)
            ended = time.monotonic()
            slices.append(
                Slice(
                    started - gateway.began, ended - gateway.began, on_gateway, on_baseline, reading
                )
            )
            cost = max(cost, ended - started)
            print_slice(len(slices), slices[-1])
        drain_s = gateway.drained(timeout=60)
        received, repeats = fake_stats(graph_port)
    return Soak(slices, start, drain_s, received - received_before, repeats - repeats_before)


def print_slice(number: int, s: Slice) -> None:
    if number == 1:
        print(
            f"{'slice':>5}{'start':>7}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'base p99':>10}"
            f"{'RSS MB':>8}{'outbox':>8}{'errors':>8}"
        )
    print(
        f"{number:>5}{_clock(s.started):>7}{s.gateway.rate:>8.0f}{s.gateway.p50_ms:>8.2f}"
        f"{s.gateway.p99_ms:>8.2f}{s.baseline.p99_ms:>10.2f}{s.reading.rss_mb:>8.1f}"
        f"{s.reading.outbox:>8.0f}{s.errors:>8}",
        flush=True,
    )


def change(first: float, last: float) -> str:
    return f"{(last / first - 1) * 100:+.1f}%"


def report(args: argparse.Namespace, result: Soak) -> None:
    found = windows(result.slices, result.start, args.minutes)
    unit = "minute" if args.minutes >= 2 else "half"
    print()
    print(
        f"per {unit} (p99 of all the {unit}'s requests; probes: the lowest and highest p99 of"
        " its baseline probes; RSS, outbox left pending as each slice's load stopped, and"
        " /metrics duration: the highest reading; loop lag: the gateway's event loop was never"
        " later than this, from its ctwa_event_loop_lag_seconds):"
    )
    print(
        f"{'window':>11}{'gw p99':>8}{'base p99':>10}{'probes':>11}{'ratio':>7}{'req/s':>8}"
        f"{'deliv/s':>9}{'RSS MB':>8}{'outbox':>8}{'/metrics ms':>13}{'loop lag ms':>13}"
    )
    for w in found:
        scrape_ms = max(s.reading.scrape_ms for s in w.slices)
        print(
            f"{w.label:>11}{w.p99('gateway'):>8.2f}{w.p99('baseline'):>10.2f}"
            f"{w.probe_range:>11}{w.p99('gateway') / w.p99('baseline'):>7.2f}{w.rate:>8.0f}"
            f"{w.delivered_rate:>9.0f}{w.rss_mb:>8.1f}{w.outbox:>8.0f}{scrape_ms:>13.1f}"
            f"{'n/a' if math.isnan(w.loop_lag_ms) else f'<= {w.loop_lag_ms:g}':>13}"
        )
    first, last = found[0], found[-1]
    gw_first, gw_last = first.p99("gateway"), last.p99("gateway")
    base_first, base_last = first.p99("baseline"), last.p99("baseline")
    relative = (gw_last / gw_first) / (base_last / base_first) - 1
    print()
    print(f"first {unit} ({first.label}) vs last {unit} ({last.label}):")
    print(f"  gateway p99   {gw_first:7.2f} ms -> {gw_last:7.2f} ms  {change(gw_first, gw_last)}")
    print(
        f"  baseline p99  {base_first:7.2f} ms -> {base_last:7.2f} ms  "
        f"{change(base_first, base_last)}"
    )
    verdict = "met" if abs(relative) <= GOAL else "NOT met"
    print(
        f"  gateway p99 change relative to baseline: {relative * 100:+.1f}%"
        f" (goal: within {GOAL:.0%}): {verdict}"
    )
    if abs(base_last / base_first - 1) > GOAL / 2:
        # A neighbour's scheduling delay adds milliseconds to both p99s, which is a far
        # larger share of the baseline's few than of the gateway's: the ratio overcorrects.
        print(
            f"  the baseline itself moved more than {GOAL / 2:.0%}: the machine was not steady"
            " (other work on these cores?), and the relative figure says more about it than"
            " about the gateway; rerun on a quiet machine"
        )
    # With every request waiting (respond_within_ms) for its event's first attempt, a
    # dispatcher that keeps up holds about one pending event per connection; one that falls
    # behind piles events up minute after minute.
    bound = max(2 * first.outbox, args.connections)
    bounded = last.outbox <= bound and result.drain_s is not None
    drain = (
        f"empty {result.drain_s:.1f} s after the load"
        if result.drain_s is not None
        else "NOT empty 60 s after the load"
    )
    print(
        f"  outbox ({SINK}): at most {first.outbox:.0f} left pending in the first {unit},"
        f" {last.outbox:.0f} in the last, {drain}:"
        f" {'bounded' if bounded else 'NOT bounded'} (bound {bound:.0f})"
    )
    minutes = (last.slices[-1].reading.at - first.slices[0].reading.at) / 60
    print(
        f"  gateway RSS   {first.rss_mb:7.1f} MB -> {last.rss_mb:7.1f} MB"
        f"  {last.rss_mb - first.rss_mb:+.1f} MB ({change(first.rss_mb, last.rss_mb)};"
        f" {(last.rss_mb - first.rss_mb) / max(minutes, 1e-9):+.2f} MB/min)"
    )
    answered = sum(s.gateway.requests - s.gateway.non_2xx for s in result.slices)
    errors = sum(s.errors for s in result.slices)
    print(
        f"delivered to the fake Graph API during the soak: {result.received} events"
        f" (wrk counted {answered} 2xx answers, without the requests in flight when each"
        f" slice stopped); sent twice: {result.repeats}; non-2xx or socket errors: {errors}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    # wrk takes whole seconds.
    parser.add_argument("--slice", type=int, default=10, help="seconds of gateway load")
    parser.add_argument("--probe", type=int, default=2, help="seconds of baseline load")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if not can_pin():
        print(
            "bench.soak needs wrk and taskset on a machine with two cores (one for the load,"
            " one for the server); without them the p99 would be the client's own"
            " (apt-get install wrk util-linux).",
            file=sys.stderr,
        )
        sys.exit(2)
    print(
        f"soak: {args.minutes:g} min of {args.slice} s slices of gateway load (shipped config,"
        f" {SINK} -> local fake Graph API) each followed by a {args.probe} s baseline probe;"
        f" wrk -t1 -c{args.connections} on cpu 0, servers on cpu 1",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = soak(args, Path(tmp))
        except subprocess.CalledProcessError as error:
            print(f"bench.soak: {error} ({error.stderr})", file=sys.stderr)
            sys.exit(1)
    report(args, result)


if __name__ == "__main__":
    main()
