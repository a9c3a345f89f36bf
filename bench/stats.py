"""The console's overview and ads funnel on an account with a million events.

Fills a store (migrated by the gateway itself) with ``--events`` events over 30 days on
``--conversations`` conversations from ``--ads`` ads (a click each, one in ten without an
ad), statuses and values as a live account has them, then serves it and times, through the
real HTTP API, in the same run:

- baseline: ``GET /healthz`` (the cheapest route: what HTTP alone costs);
- overview: ``GET /v1/whatsapp/stats?groupBy=day`` for the last 30 days (every event);
- funnel: ``GET /v1/whatsapp/stats?groupBy=ad`` for the last 30 days;
- events: ``GET /v1/whatsapp/conversions?status=failed`` (the console's events page).

Prints p50/p99 (ms) and the ratio to the baseline; the goal is an overview under 300 ms.

    python -m bench.stats [--events 1000000] [--calls 30]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import tomli_w

from bench.load import free_port, python, server
from bench.target import KEY
from gateway.store.database import SqliteStore

DAY = 86400


async def migrate(db: Path) -> None:
    store = await SqliteStore.open(db)
    await store.close()


def fill(db: Path, events: int, conversations: int, ads: int) -> None:
    """Write the conversations and events straight into the store, in one transaction."""
    now = int(time.time())
    span = 30 * DAY
    with sqlite3.connect(db) as conn:
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " INSERT INTO conversations (id, account_id, created_at, wa_id, last_inbound_at,"
            " ctwa_clid, ctwa_captured_at, ctwa_clicked_at, ctwa_source_id, ctwa_source_url,"
            " ctwa_headline, ctwa_source_type)"
            " SELECT 'conv_' || i, 'bench', ? - i * ?, 16505550000 + i, ? - i * ?,"
            " CASE WHEN i % 10 != 0 THEN 'clid-' || i END, ? - i * ?, ? - i * ?,"
            " CASE WHEN i % 10 != 0 THEN '1202263058548' || (i % ?) END,"
            " 'https://fb.me/ad' || (i % ?), 'Ad number ' || (i % ?),"
            " CASE WHEN i % 10 != 0 THEN 'ad' END FROM n",
            (conversations, *[now, span / conversations] * 4, ads, ads, ads),
        )
        # Each event a little after its conversation's click; 2% failed, 1% pending, 1%
        # expired, the rest delivered; purchases in USD or EUR, leads without a value.
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " INSERT INTO events (account_id, event_id, event_name, conversation_id,"
            " event_time, status, event, received_at, duration_ms, insert_token,"
            " attribution_window_expired)"
            " SELECT 'bench', 'e-' || i,"
            " CASE i % 3 WHEN 0 THEN 'LeadSubmitted' ELSE 'Purchase' END,"
            " 'conv_' || (1 + i % ?), CAST(? - (1 + i % ?) * ? + 600 + i % 3600 AS INTEGER),"
            " CASE WHEN i % 50 = 0 THEN 'failed' WHEN i % 97 = 0 THEN 'pending'"
            " WHEN i % 101 = 0 THEN 'expired' ELSE 'delivered' END,"
            " CAST(CASE i % 3 WHEN 0 THEN"
            ' \'{"user_data":{"whatsapp_business_account_id":"102290129340398",'
            '"ctwa_clid":"clid"}}\' ELSE'
            ' \'{"user_data":{"whatsapp_business_account_id":"102290129340398",'
            '"ctwa_clid":"clid"},"custom_data":{"currency":"\''
            " || CASE WHEN i % 7 = 0 THEN 'EUR' ELSE 'USD' END || '\",\"value\":'"
            " || (i % 200) || '.99}}' END AS BLOB),"
            " ? - (1 + i % ?) * ? + 601, 1.0, '', i % 20 = 0 FROM n",
            (
                events,
                conversations,
                now,
                conversations,
                span / conversations,
                now,
                conversations,
                span / conversations,
            ),
        )
        # The reporting columns and hourly counts the gateway's insert fills, as the
        # migration fills them for events already stored.
        conn.execute(
            "UPDATE events SET"
            " custom_value = json_extract(CAST(event AS TEXT), '$.custom_data.value'),"
            " custom_currency = json_extract(CAST(event AS TEXT), '$.custom_data.currency')"
        )
        conn.execute(
            "INSERT INTO event_hours SELECT account_id, event_time / 3600, event_name, status,"
            " COALESCE(custom_currency, ''), attribution_window_expired, COUNT(*),"
            " COALESCE(SUM(custom_value), 0) FROM events GROUP BY 1, 2, 3, 4, 5, 6"
        )
        conn.execute(
            "INSERT INTO deliveries (event_pk, sink, status, attempts, events_received,"
            " updated_at) SELECT pk, 'meta_capi', status, 1, 1, received_at FROM events"
        )
        conn.execute(
            "INSERT INTO delivery_counts SELECT account_id, 'meta_capi', status, COUNT(*)"
            " FROM events GROUP BY 1, 2, 3"
        )
        conn.execute("ANALYZE")


async def timed(url: str, calls: int, headers: dict[str, str]) -> list[float]:
    async with aiohttp.ClientSession() as session:
        took = []
        for _ in range(calls + 2):
            started = time.perf_counter()
            async with session.get(url, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}")
            took.append((time.perf_counter() - started) * 1000)
        return took[2:]  # the first calls warm the page cache


def pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--ads", type=int, default=40)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        db = folder / "bench.sqlite3"
        asyncio.run(migrate(db))
        began = time.perf_counter()
        fill(db, args.events, args.conversations, args.ads)
        print(
            f"stats: {args.events} events on {args.conversations} conversations from"
            f" {args.ads} ads written in {time.perf_counter() - began:.1f} s"
            f" ({db.stat().st_size / 1e6:.0f} MB)"
        )
        port = free_port()
        config = {
            "server": {"host": "127.0.0.1", "port": port},
            "store": {"path": str(db)},
            "accounts": [
                {"id": "bench", "waba_id": "102290129340398", "phone_number_id": "106540352242922"}
            ],
            "auth": {"keys": [{"name": "bench", "key_env": "BENCH_KEY", "accounts": ["*"]}]},
            "plugins": {"sinks": ["log"]},
            "logging": {"level": "warning", "format": "json"},
        }
        path = folder / "stats.toml"
        path.write_bytes(tomli_w.dumps(config).encode())
        argv = [python(), "-m", "gateway", "serve", "--config", str(path)]
        headers = {"Authorization": f"Bearer {KEY}"}
        base = f"http://127.0.0.1:{port}"
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 30 * DAY))
        runs = {
            "baseline /healthz": "/healthz",
            "overview (day)": f"/v1/whatsapp/stats?accountId=bench&since={since}&groupBy=day",
            "funnel (ad)": f"/v1/whatsapp/stats?accountId=bench&since={since}&groupBy=ad",
            "events (failed)": "/v1/whatsapp/conversions?accountId=bench&status=failed",
        }
        results = {}
        with server(argv, port, {"BENCH_KEY": KEY}, folder / "server.log"):
            for label, route in runs.items():
                results[label] = asyncio.run(timed(base + route, args.calls, headers))
    base_p50 = pct(results["baseline /healthz"], 50)
    print(f"{'':<20}{'p50 ms':>10}{'p99 ms':>10}{'p50 / baseline':>16}")
    for label, took in results.items():
        p50 = pct(took, 50)
        print(f"{label:<20}{p50:>10.1f}{pct(took, 99):>10.1f}{p50 / base_p50:>16.0f}")
    verdict = "meets" if pct(results["overview (day)"], 99) < 300 else "MISSES"
    print(f"overview p99 {verdict} the 300 ms goal")


if __name__ == "__main__":
    main()
