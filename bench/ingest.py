"""Accepted conversion events per second through the real HTTP stack, against a minimal server.

Runs, in one go and on the same load generator (an aiohttp client pool on loopback):
  1. a minimal aiohttp handler (read body, answer fixed JSON): the baseline;
  2. the gateway with the log sink and group commit (synchronous=FULL, WAL);
  3. the gateway with one commit per request (``group_commit_max = 1``), to show what group
     commit buys.
and prints requests/s, p50/p99 latency and each ratio to the baseline.

    python -m bench.ingest [--seconds 10] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import tomli_w

from bench.load import Result, cpu_seconds, drive, free_port, python, server
from gateway.domain import Conversation
from gateway.store.database import Store

KEY = "bench-key-0123456789abcdef"
CONVERSATIONS = 1000


async def seed(db: Path) -> list[str]:
    store = await Store.open(db)
    try:
        ids = []
        for i in range(CONVERSATIONS):
            now = time.time()
            conversation = Conversation(
                id=f"conv_bench_{i}",
                account_id="bench",
                wa_id=str(16505550000 + i),
                created_at=now,
                last_inbound_at=now,
                ctwa_clid=f"clid-{i}",
                ctwa_captured_at=now,
            )
            await store.add_conversation(conversation)
            ids.append(conversation.id)
        return ids
    finally:
        await store.close()


def write_config(folder: Path, port: int, group_commit_max: int) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "store": {"path": str(folder / "bench.sqlite3"), "group_commit_max": group_commit_max},
        "accounts": [
            {"id": "bench", "waba_id": "102290129340398", "phone_number_id": "106540352242922"}
        ],
        "auth": {"keys": [{"name": "bench", "key_env": "BENCH_KEY", "accounts": ["*"]}]},
        "plugins": {"sinks": ["log"]},
        "logging": {"level": "info", "format": "json"},
    }
    path = folder / f"bench-{group_commit_max}.toml"
    path.write_bytes(tomli_w.dumps(config).encode())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ids = asyncio.run(seed(folder / "bench.sqlite3"))
        run_id = int(time.time() * 1000)

        def body(n: int) -> bytes:
            return json.dumps(
                {
                    "accountId": "bench",
                    "eventName": "Purchase",
                    "eventId": f"bench-{run_id}-{n}",
                    "conversationId": ids[n % len(ids)],
                    "value": 19.99,
                    "currency": "USD",
                    "email": f"person{n}@example.com",
                    "contentIds": ["sku-1"],
                }
            ).encode()

        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        load = {"seconds": args.seconds, "concurrency": args.concurrency, "ok": (200,)}
        results: dict[str, tuple[Result, float]] = {}

        def measure(label: str, argv: list[str], port: int, env: dict[str, str]) -> None:
            with server(argv, port, env, folder / f"{len(results)}.log") as proc:
                url = f"http://127.0.0.1:{port}/v1/whatsapp/conversions"
                cpu_before = cpu_seconds(proc.pid)
                result = drive(url, body, headers, **load)
                # Includes the 1 s warm-up, so it is divided by all requests served.
                cpu = cpu_seconds(proc.pid) - cpu_before
            results[label] = (result, cpu)

        port = free_port()
        measure(
            "minimal aiohttp handler",
            [python(), "-m", "bench.baseline_server", str(port)],
            port,
            {},
        )
        for label, batch in (("gateway, group commit", 1000), ("gateway, per-row commit", 1)):
            port = free_port()
            config = write_config(folder, port, batch)
            argv = [python(), "-m", "gateway", "serve", "--config", str(config)]
            measure(label, argv, port, {"BENCH_KEY": KEY})
            run_id += 1_000_000_000

    base = results["minimal aiohttp handler"][0].rate
    print(f"ingest: {args.seconds:.0f} s per target, {args.concurrency} connections, loopback")
    print(
        f"{'target':<28}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}"
        f"{'server CPU s':>14}{'ratio':>8}"
    )
    for label, (result, cpu) in results.items():
        print(
            f"{label:<28}{result.rate:>10.0f}{result.percentile(50):>10.2f}"
            f"{result.percentile(99):>10.2f}{result.errors:>8}{cpu:>14.2f}"
            f"{result.rate / base:>8.2f}"
        )


if __name__ == "__main__":
    main()
