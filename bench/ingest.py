"""Accepted conversions per second on one core, against a minimal aiohttp handler on that core.

The method (issue 14): ``taskset -c 0 wrk -t1 -c64 --latency`` on one core, the server with
every thread pinned to the other (``taskset -a -cp 1``). The gateway runs the shipped
``config.toml`` (log sink, logs at info to a file); each request is a Purchase with value and
currency by ``phoneE164`` of a conversation captured beforehand through the signed webhook,
with a fresh ``eventId``. The baseline is a handler that reads the body and answers a small
JSON. A third server, the floor (``bench.floor_server``: the issue's prototype, a durable
insert with nothing else), shows what this stack can do at best, and so how much CPU the goal
leaves for everything the gateway adds. The three alternate for ``--rounds`` rounds; the
summary is the median of each figure, and of the per-round ratios. With valgrind installed,
each is then run under callgrind to count instructions per request (repeatable whatever the
machine is doing).

    python -m bench.ingest [--seconds 5] [--rounds 3] [--connections 64] [--no-instructions]

wrk comes from Debian (``apt-get install wrk``); without it (or without a second core) the
bench falls back to an aiohttp client, unpinned, which needs a core of its own and so holds
the baseline down: its ratios read high.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.load import drive, free_port, python, server
from bench.pinned import (
    WrkResult,
    can_count_instructions,
    can_pin,
    instructions_since_zero,
    lua_script,
    pin,
    thread_cpu_seconds,
    under_callgrind,
    wrk,
    zero_instructions,
)
from bench.target import ENV, KEY, Buckets, capture, histogram, metrics, quantile, shipped_config

PATH = "/v1/whatsapp/conversions"
PHONE = "16505551234"
TEMPLATE = (
    '{"accountId":"demo","eventName":"Purchase","eventId":"%s-%d",'
    '"phoneE164":"+' + PHONE + '","value":19.99,"currency":"USD"}'
)
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@dataclass
class Sample:
    result: WrkResult
    cpu_all: float  # seconds, every thread
    cpu_main: float  # seconds, the event loop's thread

    def per_request_us(self, cpu: float) -> float:
        return cpu / max(1, self.result.requests) * 1e6


@dataclass
class Target:
    label: str
    argv: list[str]
    port: int
    env: dict[str, str]
    captures: bool  # needs a conversation captured through the webhook first


def targets(folder: Path) -> list[Target]:
    """The baseline first, the gateway second, then the floor (``bench.floor_server``)."""
    base_port, gateway_port, floor_port = free_port(), free_port(), free_port()
    config = shipped_config(folder, gateway_port)
    return [
        Target(
            "minimal aiohttp handler",
            [python(), "-m", "bench.baseline_server", str(base_port)],
            base_port,
            {},
            captures=False,
        ),
        Target(
            "gateway (shipped config)",
            [python(), "-m", "gateway", "serve", "--config", str(config)],
            gateway_port,
            ENV,
            captures=True,
        ),
        Target(
            "floor (issue's prototype)",
            [python(), "-m", "bench.floor_server", str(floor_port), str(folder / "floor.db")],
            floor_port,
            {},
            captures=False,
        ),
    ]


def measure(target: Target, pid: int, seconds: float, connections: int, prefix: str) -> Sample:
    script = lua_script(PATH, HEADERS, TEMPLATE, prefix)
    all_before, main_before = thread_cpu_seconds(pid), thread_cpu_seconds(pid, pid)
    result = wrk(
        f"http://127.0.0.1:{target.port}", script, connections=connections, seconds=seconds
    )
    return Sample(
        result,
        thread_cpu_seconds(pid) - all_before,
        thread_cpu_seconds(pid, pid) - main_before,
    )


def pinned_rounds(args: argparse.Namespace, folder: Path) -> None:
    found = targets(folder)
    samples: dict[str, list[Sample]] = {t.label: [] for t in found}
    gateway = found[1]
    run = int(time.time())
    with contextlib.ExitStack() as stack:
        procs = {
            t.label: stack.enter_context(server(t.argv, t.port, t.env, folder / f"{t.port}.log"))
            for t in found
        }
        for target in found:
            pin(procs[target.label].pid)
            if target.captures:
                capture(target.port, PHONE)
            # Warm-up: connections, caches, the store's first pages; not counted.
            measure(target, procs[target.label].pid, 2, args.connections, f"warm-{run}")
        commits_before = histogram(metrics(f"http://127.0.0.1:{gateway.port}"), _COMMITS)
        for round_ in range(args.rounds):
            # Alternate the order, so a drift of the machine hits all alike.
            order = found if round_ % 2 == 0 else found[::-1]
            for target in order:
                prefix = f"r{run}-{round_}"
                sample = measure(
                    target, procs[target.label].pid, args.seconds, args.connections, prefix
                )
                if sample.result.non_2xx or sample.result.socket_errors:
                    raise RuntimeError(f"{target.label}: errors in round {round_}: {sample}")
                samples[target.label].append(sample)
        commits_after = histogram(metrics(f"http://127.0.0.1:{gateway.port}"), _COMMITS)
        disk_ms = write_and_sync_ms(folder)
    report(args, samples)
    p50, p99 = (quantile(commits_before, commits_after, q) * 1000 for q in (0.5, 0.99))
    accepted = sum(s.result.requests for s in samples[gateway.label])
    print(
        f"commit turnaround in the gateway's rounds ({_COMMITS}: its statements, the hop to"
        f" the writer's thread, the fsync, the way back to the loop): p50 {p50:.1f} ms, p99"
        f" {p99:.1f} ms, {per_commit(accepted, commits_before, commits_after)} conversions per"
        f" commit; this disk writes and fdatasyncs a commit's WAL frames ({_FRAMES} pages) in"
        f" {disk_ms:.2f} ms (median)"
    )
    store = folder / f"gateway-{gateway.port}.sqlite3"
    events, size = stored_bytes(store)
    print(
        f"store: {events} events in {size / 1e6:.1f} MB, {size / max(1, events):.0f} bytes per"
        " event (file size after a checkpoint; the one conversation and its click included)"
    )


_COMMITS = "ctwa_store_commit_seconds"


def per_commit(requests: int, before: Buckets, after: Buckets) -> str:
    """Conversions per group commit between two scrapes of the commit histogram (its +Inf
    bucket counts the commits), to one decimal."""
    commits = (after[-1][1] - before[-1][1]) if after else 0.0
    return f"{requests / commits:.1f}" if commits > 0 else "?"


# WAL frames a group commit of about 30 conversions writes (a page and its 24-byte header).
_FRAMES = 26


def write_and_sync_ms(folder: Path, times: int = 50) -> float:
    """The median time (ms) this disk takes to append a commit's WAL frames and fdatasync
    them: the floor under a commit's turnaround."""
    frames = os.urandom(_FRAMES * (4096 + 24))
    path = folder / "fsync-probe"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    taken = []
    try:
        for i in range(times):
            started = time.perf_counter()
            os.pwrite(fd, frames, i * len(frames))
            os.fdatasync(fd)
            taken.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(taken) * 1000


def stored_bytes(store: Path) -> tuple[int, int]:
    """Return the events in a stopped gateway's store and the file's size once checkpointed."""
    with sqlite3.connect(store) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (events,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()
    return int(events), store.stat().st_size


def report(args: argparse.Namespace, samples: dict[str, list[Sample]]) -> None:
    base_label, gw_label, floor_label = list(samples)
    base = samples[base_label]
    others = {label: runs for label, runs in samples.items() if label != base_label}
    print(
        f"ingest: wrk -t1 -c{args.connections} pinned to cpu 0, server pinned to cpu 1,"
        f" {args.rounds} rounds of {args.seconds:g} s, interleaved"
    )
    print(f"{'target':<36}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'main thr':>10}")
    for label, runs in samples.items():
        for i, s in enumerate(runs):
            print(
                f"{label + f' #{i + 1}':<36}{s.result.rate:>9.0f}{s.result.p50_ms:>9.2f}"
                f"{s.result.p99_ms:>9.2f}{s.per_request_us(s.cpu_all):>12.0f}"
                f"{s.per_request_us(s.cpu_main):>10.0f}"
            )

    def median(label: str, figure: Callable[[Sample], float]) -> float:
        return statistics.median(figure(s) for s in samples[label])

    for label in samples:
        print(
            f"{label + ' (median)':<36}{median(label, lambda s: s.result.rate):>9.0f}"
            f"{median(label, lambda s: s.result.p50_ms):>9.2f}"
            f"{median(label, lambda s: s.result.p99_ms):>9.2f}"
            f"{median(label, lambda s: s.per_request_us(s.cpu_all)):>12.0f}"
            f"{median(label, lambda s: s.per_request_us(s.cpu_main)):>10.0f}"
        )
    ratios = {
        label: [g.result.rate / b.result.rate for b, g in zip(base, runs, strict=True)]
        for label, runs in others.items()
    }
    p99s = [g.result.p99_ms / b.result.p99_ms for b, g in zip(base, others[gw_label], strict=True)]
    print(
        "ratio gateway/baseline req/s (median of rounds):"
        f" {statistics.median(ratios[gw_label]):.2f}x (goal >= 0.50x)"
    )
    print(
        "ratio gateway/baseline p99 (median of rounds):"
        f" {statistics.median(p99s):.2f}x (goal <= 3x)"
    )
    floor = statistics.median(ratios[floor_label])
    # What the goal leaves for everything the gateway does beyond the floor: at 0.50x a
    # request may take two baseline requests' CPU, of which the floor takes its own.
    base_cpu = median(base_label, lambda s: s.per_request_us(s.cpu_all))
    floor_cpu = median(floor_label, lambda s: s.per_request_us(s.cpu_all))
    print(
        f"ratio floor/baseline req/s (median of rounds): {floor:.2f}x; at 0.50x the gateway may"
        f" spend {2 * base_cpu - floor_cpu:.0f} µs of CPU per request beyond the floor's"
        f" {floor_cpu:.0f} (baseline {base_cpu:.0f} µs/request)"
    )


def instructions(args: argparse.Namespace, folder: Path) -> None:
    """Instructions per request of each target, counted by callgrind after a warm-up."""
    print(f"instructions per request (callgrind, {args.instruction_seconds:g} s of -c16 load):")
    counts = {}
    (folder / "callgrind").mkdir(exist_ok=True)
    for target in targets(folder / "callgrind"):
        argv = under_callgrind(target.argv, folder / "callgrind")
        log = folder / f"callgrind-{target.port}.log"
        with server(argv, target.port, target.env, log, start_timeout=600) as proc:
            if target.captures:
                capture(target.port, PHONE)
            url = f"http://127.0.0.1:{target.port}"
            script = lua_script(PATH, HEADERS, TEMPLATE, f"cg-{time.time_ns()}")
            wrk(url, script, connections=16, seconds=5, pinned=False)
            before = histogram(metrics(url), _COMMITS) if target.captures else ()
            zero_instructions(proc.pid)
            script = lua_script(PATH, HEADERS, TEMPLATE, f"cg-{time.time_ns()}")
            result = wrk(
                url, script, connections=16, seconds=args.instruction_seconds, pinned=False
            )
            total = instructions_since_zero(proc.pid, folder / "callgrind")
            # Under callgrind a request takes ~50 times longer and a commit does not: each
            # commit takes fewer conversions than at full speed, so its own cost weighs more
            # on each (the scrape between the counts is not one of the requests).
            batches = (
                f", {per_commit(result.requests, before, histogram(metrics(url), _COMMITS))}"
                " per commit"
                if target.captures
                else ""
            )
        counts[target.label] = total / max(1, result.requests)
        thousands = counts[target.label] / 1000
        print(f"  {target.label:<27}{thousands:>9,.0f}k ({result.requests} requests{batches})")
    base, *_ = counts.values()
    for label, count in list(counts.items())[1:]:
        print(f"  {label} / baseline: {count / base:.2f}x the instructions")


def unpinned(args: argparse.Namespace) -> None:
    print(
        "wrk or taskset (or a second core) missing: an aiohttp client, unpinned; ratios read high"
    )
    with tempfile.TemporaryDirectory() as tmp:
        found = targets(Path(tmp))
        run = int(time.time() * 1000)
        rates = {}
        for target in found:
            with server(target.argv, target.port, target.env, Path(tmp) / f"{target.port}.log"):
                if target.captures:
                    capture(target.port, PHONE)
                result = drive(
                    f"http://127.0.0.1:{target.port}{PATH}",
                    lambda n: (TEMPLATE % (run, n)).encode(),
                    HEADERS,
                    seconds=args.seconds,
                    concurrency=args.connections,
                    ok=(200,),
                )
            rates[target.label] = result.rate
            print(
                f"{target.label:<27}{result.rate:>9.0f} req/s  p99 {result.percentile(99):.2f} ms"
            )
        base, *_ = rates.values()
        for label, rate in list(rates.items())[1:]:
            print(f"ratio {label} / baseline: {rate / base:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--no-instructions", action="store_true")
    parser.add_argument("--instruction-seconds", type=float, default=20.0)
    args = parser.parse_args()
    if not can_pin():
        unpinned(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        pinned_rounds(args, Path(tmp))
        if can_count_instructions() and not args.no_instructions:
            instructions(args, Path(tmp))


if __name__ == "__main__":
    main()
