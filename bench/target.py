"""The gateway as the benchmarks run it: the shipped config, and conversations to convert.

``shipped_config`` is ``config.toml`` as a newcomer gets it (log sink, logs at info), moved to
a free port and a throwaway store; ``capture`` records a click through the signed webhook, the
way a real conversation starts; ``seed`` writes many conversations straight into a store;
``metrics``, ``histogram`` and ``quantile`` read its /metrics.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
import urllib.request
from pathlib import Path

import tomli_w

from gateway.domain import Conversation
from gateway.http.signature import sign
from gateway.store.database import SqliteStore

__all__ = [
    "ENV",
    "KEY",
    "Buckets",
    "capture",
    "histogram",
    "metrics",
    "quantile",
    "seed",
    "shipped_config",
]

KEY = "bench-key-0123456789abcdef"
SECRET = "bench-app-secret"
# The secrets config.toml names, as scripts/dev serve exports them.
ENV = {
    "CTWA_DEMO_API_KEY": KEY,
    "CTWA_APP_SECRET": SECRET,
    "CTWA_WEBHOOK_VERIFY_TOKEN": "bench-verify-token",
    "CTWA_METRICS_KEY": "bench-metrics-key",
}
SHIPPED = Path(__file__).resolve().parent.parent / "config.toml"


def shipped_config(folder: Path, port: int, **overrides: dict[str, object]) -> Path:
    """Write config.toml with its port and store moved (and any table's keys overridden)."""
    config = tomllib.loads(SHIPPED.read_text())
    config["server"]["port"] = port
    config["store"]["path"] = str(folder / f"gateway-{port}.sqlite3")
    for table, values in overrides.items():
        config.setdefault(table, {}).update(values)
    path = folder / f"config-{port}.toml"
    path.write_bytes(tomli_w.dumps(config).encode())
    return path


def capture(port: int, phone: str) -> None:
    """Post a signed notification: ``phone`` taps the demo account's ad and writes."""
    message = {
        "from": phone,
        "id": f"wamid.bench.{phone}.{time.time_ns()}",
        "timestamp": str(int(time.time())),
        "type": "text",
        "text": {"body": "Can I get more info about this?"},
        "referral": {
            "source_url": "https://fb.me/3cr4Wqqkv",
            "source_id": "120226305854810726",
            "source_type": "ad",
            "headline": "Chat with us",
            "media_type": "image",
            "ctwa_clid": f"clid-bench-{phone}",
        },
    }
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
        "contacts": [{"profile": {"name": "Bench"}, "wa_id": phone}],
        "messages": [message],
    }
    body = json.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [
                {"id": "102290129340398", "changes": [{"field": "messages", "value": value}]}
            ],
        }
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/webhooks/whatsapp",
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-Hub-Signature-256": sign(SECRET.encode(), body),
        },
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        if answer.status != 200:
            raise RuntimeError(f"the capture failed: HTTP {answer.status}")


async def seed(db: Path, count: int = 1000) -> list[str]:
    """Write ``count`` conversations with a click straight into the store at ``db``."""
    store = await SqliteStore.open(db)
    try:
        ids = []
        for i in range(count):
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


# A Prometheus histogram as scraped: (upper bound in seconds, cumulative count), +Inf last.
Buckets = tuple[tuple[float, float], ...]


def metrics(url: str) -> str:
    """The /metrics text of the gateway at ``url`` (with the metrics key the shipped config
    names)."""
    request = urllib.request.Request(
        f"{url}/metrics",
        headers={"Authorization": f"Bearer {ENV['CTWA_METRICS_KEY']}"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return str(answer.read().decode())


def histogram(text: str, name: str) -> Buckets:
    """The buckets of histogram ``name`` (one without labels) in a /metrics text."""
    found = re.findall(rf'^{re.escape(name)}_bucket\{{le="([^"]+)"\}} (\S+)$', text, re.M)
    return tuple((float(le), float(count)) for le, count in found)


def quantile(before: Buckets, after: Buckets, q: float) -> float:
    """The ``q`` quantile (seconds) of what was observed between two scrapes, interpolated
    within its bucket as Prometheus's histogram_quantile does (the lowest bucket from 0)."""
    counts = dict(before)
    grown = [(bound, count - counts.get(bound, 0.0)) for bound, count in after]
    if not grown or grown[-1][1] <= 0:
        return float("nan")
    rank = q * grown[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in grown:
        if count >= rank:
            if bound == float("inf"):
                return lower  # past the last bound: all that can be said
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower
