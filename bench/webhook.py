"""Webhook messages per second through the real endpoint, signature check included.

Posts notifications of 1,000 messages each (Meta's largest batch; half of them carry an ad
referral with a click id; every tenth sender is known by BSUID only), signed like Meta signs
them, first to a minimal aiohttp handler that only reads the body (the baseline), then to the
gateway with the notification archive off and on: it verifies the HMAC, decodes, captures (and
archives) each notification in one transaction. Prints messages/s, the latency of one
1,000-message notification, the ratio to the baseline, and archive on / archive off, all from
the same run.

    python -m bench.webhook [--posts 40] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

from bench.load import cpu_seconds, free_port, python, server
from gateway.http.signature import sign

SECRET = "bench-app-secret"
KEY = "bench-key-0123456789abcdef"
PER_POST = 1000


def notification(post: int, run: int) -> bytes:
    now = int(time.time())
    messages: list[dict[str, Any]] = []
    for i in range(PER_POST):
        msg: dict[str, Any] = {
            "from_user_id": f"US.{run}{post * PER_POST + i}",
            "id": f"wamid.bench.{run}.{post}.{i}",
            "timestamp": str(now),
            "text": {"body": "Can I get more info about this?"},
            "type": "text",
        }
        if i % 10:
            msg["from"] = str(10_000_000_000 + post * PER_POST + i)
        if i % 2 == 0:
            msg["referral"] = {
                "source_url": "https://fb.me/3cr4Wqqkv",
                "source_id": "120226305854810726",
                "source_type": "ad",
                "headline": "Chat with us",
                "media_type": "image",
                "ctwa_clid": f"clid-{run}-{post}-{i}",
            }
        messages.append(msg)
    payload = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": "106540352242922",
                            },
                            "messages": messages,
                        },
                    }
                ],
            }
        ],
    }
    return json.dumps(payload, separators=(",", ":")).encode()


async def send_all(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    queue = list(reversed(bodies))
    latencies: list[float] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            body = queue.pop()
            headers = {
                "X-Hub-Signature-256": sign(SECRET.encode(), body),
                "Content-Type": "application/json",
            }
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession() as session:
        begun = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return time.perf_counter() - begun, latencies


def _config(folder: Path, port: int, *, archive: bool) -> Path:
    config = folder / f"bench-{archive}.toml"
    config.write_bytes(
        tomli_w.dumps(
            {
                "server": {"port": port},
                "store": {"path": str(folder / f"bench-{archive}.sqlite3")},
                "accounts": [
                    {
                        "id": "bench",
                        "waba_id": "102290129340398",
                        "phone_number_id": "106540352242922",
                    }
                ],
                "webhook": {"app_secret_env": "BENCH_SECRET", "archive": archive},
                "logging": {"format": "json"},
            }
        ).encode()
    )
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=40, help="notifications per target")
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    run = int(time.time())
    results: dict[str, tuple[float, list[float], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        targets: dict[str, bool | None] = {
            "minimal aiohttp handler": None,
            "gateway, archive off": False,
            "gateway, archive on": True,
        }
        for label, archive in targets.items():
            port = free_port()
            if archive is None:
                command = [python(), "-m", "bench.baseline_server", str(port)]
                path = "/v1/whatsapp/conversions"
            else:
                config = _config(folder, port, archive=archive)
                command = [python(), "-m", "gateway", "serve", "--config", str(config)]
                path = "/webhooks/whatsapp"
            bodies = [notification(i, run) for i in range(args.posts)]
            run += 1
            env = {"BENCH_SECRET": SECRET, "BENCH_KEY": KEY}
            with server(command, port, env, folder / f"{len(results)}.log") as proc:
                before = cpu_seconds(proc.pid)
                elapsed, latencies = asyncio.run(
                    send_all(f"http://127.0.0.1:{port}{path}", bodies, args.concurrency)
                )
                results[label] = (elapsed, latencies, cpu_seconds(proc.pid) - before)
    base = (args.posts * PER_POST) / results["minimal aiohttp handler"][0]
    print(
        f"webhook: {args.posts} notifications x {PER_POST} messages per target,"
        f" {args.concurrency} in flight, loopback"
    )
    print(
        f"{'target':<26}{'messages/s':>12}{'p50 ms/post':>13}{'max ms':>9}"
        f"{'server CPU s':>14}{'ratio':>8}"
    )
    for label, (elapsed, latencies, cpu) in results.items():
        rate = args.posts * PER_POST / elapsed
        print(
            f"{label:<26}{rate:>12.0f}{statistics.median(latencies) * 1000:>13.1f}"
            f"{max(latencies) * 1000:>9.1f}{cpu:>14.2f}{rate / base:>8.2f}"
        )
    on, off = results["gateway, archive on"][0], results["gateway, archive off"][0]
    print(f"archive on / archive off (messages/s): {off / on:.2f} (the issue allows >= 0.70)")


if __name__ == "__main__":
    main()
