"""Sustained load on the full stack (Meta sink to a local fake Graph API), memory and outbox.

Runs a bounded aiohttp client pool on loopback against, in one go:
  1. the minimal aiohttp handler (the baseline);
  2. the gateway with the ``meta_capi`` sink delivering to a fake Graph API in another process.
For each it prints accepted events/s, p50/p99 latency and peak RSS; for the gateway also
delivered events/s, and a once-a-second series of RSS and outbox depth (from ``/metrics``) so a
long run shows whether memory stays flat and the outbox bounded.

    python -m bench.soak [--seconds 20] [--concurrency 64]     # a soak: --seconds 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import tomli_w

from bench.load import free_port, python, server
from bench.target import KEY, seed

_PENDING = re.compile(r'^ctwa_outbox_pending\{sink="meta_capi"\} ([0-9.e+]+)$', re.M)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Run:
    accepted: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # t, rss, outbox
    seconds: float = 0.0


async def load(
    url: str, ids: list[str], pid: int, seconds: float, concurrency: int, metrics_url: str | None
) -> Run:
    run = Run()
    counter = 0
    stop_at = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    tag = int(time.time() * 1000)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal counter
        while time.perf_counter() < stop_at:
            counter += 1
            body = json.dumps(
                {
                    "accountId": "bench",
                    "eventName": "Purchase",
                    "eventId": f"soak-{tag}-{counter}",
                    "conversationId": ids[counter % len(ids)],
                    "value": 19.99,
                    "currency": "USD",
                }
            ).encode()
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status in (200, 202):
                    run.accepted += 1
                else:
                    run.errors += 1
            run.latencies.append(time.perf_counter() - started)

    async def sampler(session: aiohttp.ClientSession) -> None:
        begun = time.perf_counter()
        while time.perf_counter() < stop_at:
            outbox = float("nan")
            if metrics_url:
                async with session.get(metrics_url) as resp:
                    found = _PENDING.search(await resp.text())
                    outbox = float(found.group(1)) if found else 0.0
            run.samples.append((time.perf_counter() - begun, rss_mb(pid), outbox))
            await asyncio.sleep(1.0)

    connector = aiohttp.TCPConnector(limit=concurrency + 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        begun = time.perf_counter()
        await asyncio.gather(sampler(session), *(worker(session) for _ in range(concurrency)))
        run.seconds = time.perf_counter() - begun
    return run


async def delivered(fake_url: str) -> tuple[int, int]:
    """Return (distinct events received, events received again) from the fake."""
    async with aiohttp.ClientSession() as session, session.get(fake_url) as resp:
        stats = await resp.json()
        return int(stats["received"]), int(stats["repeats"])


def pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1] * 1000 if len(values) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        db = folder / "soak.sqlite3"
        ids = asyncio.run(seed(db))
        graph_port = free_port()
        fake = [python(), "-m", "bench.fake_graph_server", str(graph_port)]
        with server(fake, graph_port, {}, folder / "graph.log"):
            port = free_port()
            base_argv = [python(), "-m", "bench.baseline_server", str(port)]
            with server(base_argv, port, {}, folder / "base.log") as proc:
                url = f"http://127.0.0.1:{port}/v1/whatsapp/conversions"
                base = asyncio.run(load(url, ids, proc.pid, args.seconds, args.concurrency, None))
            port = free_port()
            config = folder / "soak.toml"
            config.write_bytes(
                tomli_w.dumps(
                    {
                        "server": {"port": port},
                        "store": {"path": str(db)},
                        "accounts": [
                            {
                                "id": "bench",
                                "waba_id": "102290129340398",
                                "phone_number_id": "106540352242922",
                                "dataset_id": "1234567890",
                                "access_token_env": "BENCH_TOKEN",
                            }
                        ],
                        "auth": {
                            "keys": [{"name": "bench", "key_env": "BENCH_KEY", "accounts": ["*"]}]
                        },
                        "plugins": {
                            "sinks": ["meta_capi"],
                            "meta_capi": {"graph_url": f"http://127.0.0.1:{graph_port}"},
                        },
                        "logging": {"level": "info", "format": "json"},
                    }
                ).encode()
            )
            argv = [python(), "-m", "gateway", "serve", "--config", str(config)]
            env = {"BENCH_KEY": KEY, "BENCH_TOKEN": "bench-token"}
            fake_stats = f"http://127.0.0.1:{graph_port}/stats"
            with server(argv, port, env, folder / "gateway.log") as proc:
                before = asyncio.run(delivered(fake_stats))
                gateway = asyncio.run(
                    load(
                        f"http://127.0.0.1:{port}/v1/whatsapp/conversions",
                        ids,
                        proc.pid,
                        args.seconds,
                        args.concurrency,
                        f"http://127.0.0.1:{port}/metrics",
                    )
                )
                after = asyncio.run(delivered(fake_stats))
                sent_to_meta, repeats = after[0] - before[0], after[1] - before[1]
    print(f"soak: {args.seconds:.0f} s per target, {args.concurrency} connections, loopback")
    print(
        f"{'target':<30}{'accepted/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'peak RSS MB':>13}{'ratio':>7}"
    )
    for label, run in (("minimal aiohttp handler", base), ("gateway + meta_capi -> fake", gateway)):
        rate = run.accepted / run.seconds
        peak = max(s[1] for s in run.samples)
        print(
            f"{label:<30}{rate:>11.0f}{pct(run.latencies, 50):>9.2f}{pct(run.latencies, 99):>9.2f}"
            f"{peak:>13.1f}{rate / (base.accepted / base.seconds):>7.2f}"
        )
    print(
        f"delivered to the fake Graph API: {sent_to_meta / gateway.seconds:.0f} events/s"
        f" ({sent_to_meta} of {gateway.accepted} accepted during the run; errors"
        f" {gateway.errors}; sent twice: {repeats})"
    )
    print("t (s)   gateway RSS MB   outbox pending")
    step = max(1, len(gateway.samples) // 12)
    for t, rss, outbox in gateway.samples[::step]:
        print(f"{t:>5.0f}   {rss:>14.1f}   {outbox:>14.0f}")


if __name__ == "__main__":
    main()
