"""Conversions accepted while housekeeping prunes a million old events, against none pruning.

Fills a store with ``--rows`` delivered events past their retention (and their deliveries),
then, in the same run, drives conversions at the gateway twice: with housekeeping off, and
with housekeeping starting a second after the server (``[retention] batch_rows`` per
transaction, ``secure_delete`` on, as shipped). Prints p50/p99 of the conversions accepted
while the prune ran, next to the same without pruning, and how long the prune took.

    python -m bench.prune [--rows 1000000] [--seconds 10] [--concurrency 32]

(``--seconds`` is the run without pruning; the other runs until the prune is done.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import tomli_w

from bench.load import free_port, python, server
from bench.target import KEY, seed

DAY = 86400


def fill(db: Path, rows: int) -> None:
    """Add ``rows`` delivered events received 200 days ago, with their deliveries."""
    old = time.time() - 200 * DAY
    with sqlite3.connect(db) as conn:
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " INSERT INTO events (account_id, event_id, event_name, conversation_id,"
            " event_time, status, event, received_at, duration_ms, insert_token)"
            " SELECT 'bench', 'old-' || i, 'Purchase', 'conv_bench_0', ?, 'delivered',"
            " CAST('{\"event_name\":\"Purchase\"}' AS BLOB), ? + i * 0.001, 1.0, 'fill' FROM n",
            (rows, int(old), old),
        )
        conn.execute(
            "INSERT INTO deliveries (event_pk, sink, status, attempts, events_received,"
            " updated_at) SELECT pk, 'log', 'delivered', 1, 1, received_at FROM events"
        )


def write_config(folder: Path, port: int, housekeeping_s: float, batch_rows: int) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "store": {"path": str(folder / "bench.sqlite3"), "housekeeping_interval_s": housekeeping_s},
        "retention": {"batch_rows": batch_rows},
        "accounts": [
            {"id": "bench", "waba_id": "102290129340398", "phone_number_id": "106540352242922"}
        ],
        "auth": {"keys": [{"name": "bench", "key_env": "BENCH_KEY", "accounts": ["*"]}]},
        "plugins": {"sinks": ["log"]},
        "logging": {"level": "info", "format": "json"},
    }
    path = folder / f"prune-{housekeeping_s}.toml"
    path.write_bytes(tomli_w.dumps(config).encode())
    return path


async def load(
    url: str,
    ids: list[str],
    run: str,
    seconds: float,
    concurrency: int,
    log: Path | None = None,
) -> list[tuple[float, float]]:
    """Send conversions for ``seconds`` (or, given the server's ``log``, until the prune in it
    has finished); return (finished at, latency s) of each."""
    done: list[tuple[float, float]] = []
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    stop_at = time.time() + (600 if log is not None else seconds)
    counter = 0

    async def watch(path: Path) -> None:
        nonlocal stop_at
        offset = 0
        while time.time() < stop_at:
            await asyncio.sleep(0.5)
            # Only what was appended: parsing the whole (growing) log would stall this loop
            # and show up as the server's latency.
            with path.open("rb") as file:
                file.seek(offset)
                new = file.read()
            offset += len(new)
            if b'"retention_applied"' in new:
                stop_at = time.time() + 1.0  # a second of calm after it, then stop
                return

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal counter
        while time.time() < stop_at:
            counter += 1
            body = {
                "accountId": "bench",
                "eventName": "Purchase",
                "eventId": f"{run}-{counter}",
                "conversationId": ids[counter % len(ids)],
                "value": 19.99,
                "currency": "USD",
            }
            started = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
            done.append((time.time(), time.perf_counter() - started))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        watcher = [watch(log)] if log is not None else []
        await asyncio.gather(*watcher, *(worker(session) for _ in range(concurrency)))
    return done


def pct(latencies: list[float], p: int) -> float:
    if len(latencies) < 2:
        return float("nan")
    return statistics.quantiles(latencies, n=100)[p - 1] * 1000


def prune_window(log: Path) -> tuple[float, float, dict[str, int]] | None:
    """When the prune ran (start, end) and what it removed, from the server's log."""
    started = ended = None
    removed: dict[str, int] = {}
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
        if entry.get("event") == "housekeeping_started" and started is None:
            started = at
        if entry.get("event") == "retention_applied":
            ended = at
            removed = {k: v for k, v in entry.items() if isinstance(v, int)}
    return None if started is None or ended is None else (started, ended, removed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-rows", type=int, default=500)
    parser.add_argument("--timeline", action="store_true", help="p99 per second while pruning")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        db = folder / "bench.sqlite3"
        ids = asyncio.run(seed(db))
        began = time.perf_counter()
        fill(db, args.rows)
        print(f"prune: {args.rows} old events (and deliveries) written in"
              f" {time.perf_counter() - began:.1f} s")  # fmt: skip
        results = {}
        for label, housekeeping_s in (("no pruning", 86400.0), ("while pruning", 1.0)):
            port = free_port()
            config = write_config(folder, port, housekeeping_s, args.batch_rows)
            argv = [python(), "-m", "gateway", "serve", "--config", str(config)]
            log = folder / f"{label.replace(' ', '-')}.log"
            with server(argv, port, {"BENCH_KEY": KEY}, log):
                url = f"http://127.0.0.1:{port}/v1/whatsapp/conversions"
                pruning = housekeeping_s < 1000
                done = asyncio.run(
                    load(
                        url,
                        ids,
                        label.replace(" ", "-"),
                        args.seconds,
                        args.concurrency,
                        log if pruning else None,
                    )
                )
            window = prune_window(log) if pruning else None
            if window is not None:
                start, end, removed = window
                if args.timeline:
                    for second in range(int(end - start) + 2):
                        lats = [
                            lat for at, lat in done if start + second <= at < start + second + 1
                        ]
                        print(f"  +{second:>3}s {len(lats):>6} req  p99 {pct(lats, 99):8.1f} ms")
                during = [lat for at, lat in done if start <= at <= end]
                results[label] = (during, f"prune {end - start:.1f} s, removed {removed}")
            else:
                results[label] = ([lat for _, lat in done], "")
    print(f"{'':<16}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for label, (latencies, note) in results.items():
        print(f"{label:<16}{len(latencies):>10}{pct(latencies, 50):>10.2f}"
              f"{pct(latencies, 99):>10.2f}  {note}")  # fmt: skip
    base, during = results["no pruning"][0], results["while pruning"][0]
    print(f"p99 while pruning / p99 without: {pct(during, 99) / pct(base, 99):.2f}")


if __name__ == "__main__":
    main()
