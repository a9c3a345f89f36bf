"""Operator endpoints, rate limits and store failures, through the real app."""

from __future__ import annotations

import asyncio
import gc
import re
import sqlite3
import time
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import parse_settings
from gateway.http.keys import PIPELINE
from gateway.http.openapi import EXAMPLES
from tests.conftest import (
    AUTH,
    ENV,
    SCOPED_KEY,
    ClientFactory,
    LogCapture,
    add_conversation,
    db_rows,
    sqlite_store_of,
    store_of,
)
from tests.payloads import encode, message, messages_change, notification, referral, signed
from tests.store_sql import add_fault

Client = TestClient[web.Request, web.Application]
URL = "/v1/whatsapp/conversions"


def lead(conversation_id: str, event_id: str) -> dict[str, Any]:
    return {
        "accountId": "acme",
        "eventName": "LeadSubmitted",
        "eventId": event_id,
        "conversationId": conversation_id,
    }


async def test_healthz_and_readyz(client: Client) -> None:
    assert (await (await client.get("/healthz")).json()) == {"status": "ok", "checks": {}}
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"store": "ok", "log": "ok", "webhook": "ok"}


async def test_readyz_says_when_webhooks_cannot_be_taken(make_client: ClientFactory) -> None:
    client = await make_client(webhook={"app_secret_env": "CTWA_NOT_SET_ANYWHERE"})
    ready = await client.get("/readyz")
    # Still ready (conversions work), but it says why every notification gets a 503.
    assert ready.status == 200
    assert (await ready.json())["checks"]["webhook"].startswith("not configured")


async def test_a_serving_app_runs_young_collections_rarely(make_client: ClientFactory) -> None:
    # At the default threshold a loaded server walked its in-flight requests' objects every
    # ~40 requests (about 5% of a conversion's CPU). Another app in this process (an earlier
    # test) has raised it already: start from Python's default.
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        client = await make_client()
        assert gc.get_threshold() == (10_000, 10, 10)
        # A higher setting (the host's own) is left alone, and so is the raised one when
        # an app stops: another may still be serving.
        gc.set_threshold(50_000, 10, 10)
        await make_client()
        await client.close()
        assert gc.get_threshold() == (50_000, 10, 10)
    finally:
        gc.set_threshold(*before)


async def test_a_stalled_event_loop_is_measured_and_logged(
    client: Client, logs: LogCapture
) -> None:
    # Every request in flight waits for a held loop: the operator sees by how long, and a
    # soak can tell the gateway's own stall from the machine's.
    await client.get("/healthz")
    await asyncio.sleep(0.25)  # the watcher has timed a few quiet turns
    assert logs.events("event_loop_stalled") == []
    time.sleep(0.8)  # noqa: ASYNC251  (the point: a synchronous call holding the loop)
    (stalled,) = await logs.wait_for("event_loop_stalled")
    assert stalled["level"] == "warning"
    assert 700 <= stalled["late_ms"] < 5000
    metrics = await (await client.get("/metrics")).text()
    buckets = {
        le: float(count)
        for le, count in re.findall(
            r'ctwa_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', metrics
        )
    }
    assert buckets["1.0"] - buckets["0.5"] == 1  # the stall, timed whole
    assert buckets["0.1"] >= 2  # the quiet turns before it


async def test_readyz_is_503_when_the_store_refuses_writes(client: Client) -> None:
    store = sqlite_store_of(client)
    store._writer_conn.execute("PRAGMA query_only = ON")
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503
    assert body["code"] == "not_ready"
    assert "store" in body["details"]["checks"]
    store._writer_conn.execute("PRAGMA query_only = OFF")
    assert (await client.get("/readyz")).status == 200


async def test_metrics_count_what_happened(client: Client) -> None:
    conversation = await add_conversation(store_of(client))
    await client.post(URL, json=lead(conversation.id, "m1"), headers=AUTH)
    await client.post(URL, json=lead(conversation.id, "m1"), headers=AUTH)
    await client.post(URL, json=lead("conv_nope", "m2"), headers=AUTH)
    body = encode(
        notification(messages_change([message("16505550300", "wamid.M", ref=referral("c"))]))
    )
    await client.post("/webhooks/whatsapp", data=body, headers=signed(body))
    await client.post("/webhooks/whatsapp", data=body, headers={"X-Hub-Signature-256": "sha256=0"})

    resp = await client.get("/metrics")
    text = await resp.text()
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert 'ctwa_http_requests_total{route="/v1/whatsapp/conversions",status="200"} 2.0' in text
    assert 'ctwa_http_requests_total{route="/v1/whatsapp/conversions",status="404"} 1.0' in text
    assert 'ctwa_events_accepted_total{account="acme",sink="log"} 1.0' in text
    assert 'ctwa_events_duplicate_total{account="acme"} 1.0' in text
    assert 'ctwa_events_stored{account="acme",sink="log",status="dry_run"} 1.0' in text
    assert 'ctwa_outbox_pending{sink="log"} 0.0' in text
    assert "ctwa_webhook_messages_total 1.0" in text
    assert "ctwa_webhook_clicks_captured_total 1.0" in text
    assert "ctwa_webhook_signature_failures_total 1.0" in text
    assert "ctwa_http_request_duration_seconds_bucket" in text
    # Every write was committed alone (the requests came one at a time), and timed.
    commits = _sample(text, "ctwa_store_commit_seconds_count")
    assert commits >= 3  # the conversation, the event m1, the capture
    assert _sample(text, "ctwa_store_writes_per_commit_sum") == commits
    # The first conversion looked its conversation up in the store.
    assert _sample(text, 'ctwa_store_lookups{result="miss"}') >= 1


def _sample(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.rsplit(" ", 1)[1])


async def test_metrics_can_require_a_key(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    settings = parse_settings({**config, "metrics": {"key_env": "CTWA_METRICS_KEY"}})
    client = await make_client(
        settings=settings, environ={**ENV, "CTWA_METRICS_KEY": "metrics-key-0123456789"}
    )
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=AUTH)).status == 401
    ok = await client.get("/metrics", headers={"Authorization": "Bearer metrics-key-0123456789"})
    assert ok.status == 200


async def test_openapi_documents_every_route_and_examples_decode(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    # With the Meta sink, so plugin routes (datasets) are in the app too.
    settings = parse_settings(
        {
            **config,
            "plugins": {"sinks": ["meta_capi"], "meta_capi": {"graph_url": "http://127.0.0.1:9"}},
        }
    )
    client = await make_client(settings=settings)
    doc = await (await client.get("/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["summary"] != "Undocumented route.", (method, path)
            assert op["responses"], (method, path)
    assert "ConversionRequest" in doc["components"]["schemas"]
    for name, (struct, example) in EXAMPLES.items():
        msgspec.convert(example, struct)  # raises if a documented example is wrong
        assert name
    body = doc["paths"]["/v1/whatsapp/conversions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["example"]["eventName"] == "Purchase"


async def test_rate_limit_per_key(make_client: ClientFactory, config: dict[str, Any]) -> None:
    config["auth"]["keys"][0].update(rate_per_s=0.5, burst=2)
    client = await make_client(settings=parse_settings(config))
    params = {"accountId": "acme"}
    statuses = [(await client.get(URL, params=params, headers=AUTH)).status for _ in range(2)]
    assert statuses == [200, 200]
    resp = await client.get(URL, params=params, headers=AUTH)
    body = await resp.json()
    assert resp.status == 429
    assert body["type"] == "rate_limit_error"
    assert body["code"] == "rate_limited"
    assert int(resp.headers["Retry-After"]) >= 1
    # Another key is not starved by this one.
    other = await client.get(
        URL, params={"accountId": "other"}, headers={"Authorization": f"Bearer {SCOPED_KEY}"}
    )
    assert other.status == 200
    metrics = await (await client.get("/metrics")).text()
    assert 'ctwa_rate_limited_total{key="admin"} 1.0' in metrics


async def test_a_full_disk_is_503_and_loses_nothing_acknowledged(client: Client) -> None:
    store = sqlite_store_of(client)
    conversation = await add_conversation(store)
    (pages,) = store._writer_conn.execute("PRAGMA page_count").fetchone()
    store._writer_conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    acknowledged = []
    refused = 0
    for i in range(300):
        resp = await client.post(URL, json=lead(conversation.id, f"d{i}"), headers=AUTH)
        if resp.status == 200:
            acknowledged.append(f"d{i}")
        else:
            body = await resp.json()
            assert resp.status == 503, body
            assert body["code"] == "store_unavailable"
            assert resp.headers["Retry-After"] == "1"
            refused += 1
    assert refused > 0
    store._writer_conn.execute("PRAGMA max_page_count = 1073741823")
    for event_id in acknowledged:
        assert await store.find_event("acme", event_id) is not None
    # Room again: the refused ones go through on retry.
    resp = await client.post(URL, json=lead(conversation.id, "d299"), headers=AUTH)
    assert resp.status == 200
    assert (await client.get("/readyz")).status == 200


async def test_readyz_is_503_while_writes_fail_on_a_full_disk(
    client: Client, logs: LogCapture
) -> None:
    # Found by review: the empty transaction /readyz committed goes through on a full disk
    # (it writes nothing), so a load balancer kept sending conversions to a replica that
    # answered each with 503 store_unavailable.
    store = sqlite_store_of(client)
    conversation = await add_conversation(store)
    (pages,) = store._writer_conn.execute("PRAGMA page_count").fetchone()
    store._writer_conn.execute(f"PRAGMA max_page_count = {pages}")
    statuses = []
    for i in range(50):
        resp = await client.post(URL, json=lead(conversation.id, f"f{i}"), headers=AUTH)
        statuses.append(resp.status)
        if resp.status == 503:
            break
    assert statuses[-1] == 503, statuses
    for _ in range(2):  # the probe fails too: still full
        ready = await client.get("/readyz")
        body = await ready.json()
        assert ready.status == 503, body
        assert body["code"] == "not_ready"
        assert "the disk is full" in body["details"]["checks"]["store"]
    assert (await client.get("/healthz")).status == 200  # alive: not to be restarted
    (failing,) = logs.events("store_not_ready")  # once, not per check
    assert "the disk is full" in failing["reason"]
    # Room again: ready at the next check, with no conversion needed to find out.
    store._writer_conn.execute("PRAGMA max_page_count = 1073741823")
    ready = await client.get("/readyz")
    assert ready.status == 200, await ready.text()
    assert logs.events("store_ready_again")
    assert await db_rows(client, "SELECT COUNT(*) FROM write_probe") == [(0,)]
    resp = await client.post(URL, json=lead(conversation.id, "after"), headers=AUTH)
    assert resp.status == 200


async def test_readyz_stays_503_while_the_dispatcher_finds_nothing_due_on_a_full_disk(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    # Found by review: any write that committed made the replica ready again, and one that
    # finds nothing to write commits on a full disk too: the Meta sink's dispatcher looks for
    # due deliveries every poll_s (an UPDATE that matched no row), so a few seconds after the
    # disk filled /readyz said 200 again, and the load balancer sent conversions back to it.
    plugins = {
        "sinks": ["meta_capi"],
        "meta_capi": {"graph_url": "http://127.0.0.1:9", "poll_s": 0.05},
    }
    client = await make_client(settings=parse_settings({**config, "plugins": plugins}))
    store = sqlite_store_of(client)
    conversation = await add_conversation(store)
    (pages,) = store._writer_conn.execute("PRAGMA page_count").fetchone()
    store._writer_conn.execute(f"PRAGMA max_page_count = {pages}")
    for i in range(50):
        resp = await client.post(URL, json=lead(conversation.id, f"d{i}"), headers=AUTH)
        if resp.status == 503:
            break
    assert resp.status == 503
    assert (await client.get("/readyz")).status == 503
    claims = store.writer.ops
    for _ in range(100):  # the dispatcher's looks commit meanwhile
        await asyncio.sleep(0.05)
        if store.writer.ops >= claims + 3:
            break
    assert store.writer.ops >= claims + 3
    ready = await client.get("/readyz")
    assert ready.status == 503, await ready.text()
    resp = await client.post(URL, json=lead(conversation.id, "still-full"), headers=AUTH)
    assert resp.status == 503
    store._writer_conn.execute("PRAGMA max_page_count = 1073741823")
    assert (await client.get("/readyz")).status == 200


async def test_a_write_that_fails_for_its_own_reason_leaves_readyz_ready(client: Client) -> None:
    # A conversion refused for what it is (a fault of its own, as a bug would be) says
    # nothing about the store: the replica stays in the load balancer's rotation.
    conversation = await add_conversation(store_of(client))
    await add_fault(client, "boom", "events", "injected fault")
    resp = await client.post(URL, json=lead(conversation.id, "own"), headers=AUTH)
    assert resp.status >= 500
    assert (await client.get("/readyz")).status == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json"])
async def test_probes_need_no_key(client: Client, path: str) -> None:
    assert (await client.get(path)).status == 200


async def test_readyz_is_503_when_the_dispatcher_is_not_running(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    plugins = {"sinks": ["meta_capi"], "meta_capi": {"graph_url": "http://127.0.0.1:9"}}
    client = await make_client(settings=parse_settings({**config, "plugins": plugins}))
    ready = await client.get("/readyz")
    assert (await ready.json())["checks"] == {"store": "ok", "meta_capi": "ok", "webhook": "ok"}
    delivery = client.app[PIPELINE].delivery
    assert delivery is not None
    await delivery.dispatchers["meta_capi"].stop()
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503
    assert body["details"]["checks"] == {"meta_capi": "its delivery dispatcher is not running"}


async def test_readyz_checks_arriving_together_queue_one_write(
    client: Client, db_path: Any
) -> None:
    # Found by review: each /readyz (no key needed) queued an empty transaction of its own
    # for the writer, left in its queue when the check gave up after 2 s; while the
    # database's write lock was held, anyone could fill the writer's queue with them, and
    # the conversions queued behind them waited for each to commit in turn.
    writer = store_of(client).writer
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        before = writer.ops
        checks = await asyncio.gather(*(client.get("/readyz") for _ in range(100)))
        assert {check.status for check in checks} == {503}
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    for _ in range(100):
        if (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.05)
    assert writer.ops - before <= 4, writer.ops - before
