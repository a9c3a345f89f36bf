"""What the reports count, what compact rows read back, what /metrics and log lines say, at
their edges: every status change, period alignment, pruning, odd values, old stores, batches
that fail, exception groups."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway import DeliveryOptions, SendOutcome, hookimpl
from gateway.config import parse_settings
from gateway.domain import SinkState, StoredEvent
from gateway.logs import JsonLine, bind, log_request, start_request_log
from gateway.store.retention import RetentionCutoffs
from gateway.store.schema import MIGRATIONS
from tests.conftest import (
    AUTH,
    ClientFactory,
    LogCapture,
    add_conversation,
    db_rows,
    store_of,
)

# Run on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_ENGINES = True

Client = TestClient[web.Request, web.Application]


async def test_metrics_parse_and_histograms_are_cumulative(client: Client) -> None:
    for path in ("/healthz", "/nope/1", "/nope/2", "/v1/whatsapp/stats?accountId=acme"):
        await client.get(path, headers=AUTH)
    texts = await asyncio.gather(*(client.get("/metrics") for _ in range(5)))
    text = await texts[-1].text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["ctwa_http_requests"]
    routes = {s.labels["route"] for s in requests.samples}
    assert "unmatched" in routes
    assert not any(r.startswith("/nope") for r in routes)
    latency = families["ctwa_http_request_duration_seconds"]
    by_route: dict[str, list[Any]] = {}
    for s in latency.samples:
        by_route.setdefault(s.labels["route"], []).append(s)
    for route, samples in by_route.items():
        buckets = [s for s in samples if s.name.endswith("_bucket")]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts), route
        assert buckets[-1].labels["le"] == "+Inf"
        (count,) = [s.value for s in samples if s.name.endswith("_count")]
        assert count == buckets[-1].value
        total = sum(
            s.value
            for s in requests.samples
            if s.labels["route"] == route and s.name.endswith("_total")
        )
        assert total == count, route


# -- the overview's hourly counts against the events themselves ---------------------------


_STATUS_KEYS = {"dry_run": "dryRun"}


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Scripted:
    """An outbox sink answering what the test says per eventId (retry otherwise)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}

    @hookimpl
    def gateway_delivery_options(self) -> Any:
        return DeliveryOptions(retry_base_s=0.05, retry_cap_s=0.1, poll_s=0.02, respond_within_ms=0)

    @hookimpl
    async def gateway_send_events(self, events: list[Any]) -> list[Any]:
        return [
            SendOutcome(status=self.outcomes.get(e.event_id, "retry"), reason="scripted")  # type: ignore[arg-type]
            for e in events
        ]


async def overview(client: Client, since: float, until: float, **params: str) -> dict[str, Any]:
    resp = await client.get(
        "/v1/whatsapp/stats",
        params={"accountId": "acme", "since": iso(since), "until": iso(until), **params},
        headers=AUTH,
    )
    assert resp.status == 200, await resp.text()
    answer: dict[str, Any] = await resp.json()
    return answer


async def counted(
    client: Client, since: float, until: float
) -> tuple[dict[str, int], dict[str, float]]:
    """The period's events by status and value by currency, straight from the events."""
    rows = await db_rows(
        client,
        "SELECT status, custom_currency, COUNT(*), SUM(custom_value) FROM events"
        " WHERE account_id = 'acme' AND event_time >= ? AND event_time < ?"
        " GROUP BY 1, 2",
        int(since),
        int(until),
    )
    statuses: dict[str, int] = {}
    values: dict[str, float] = {}
    for status, currency, count, value in rows:
        key = _STATUS_KEYS.get(status, status)
        statuses[key] = statuses.get(key, 0) + count
        if currency:
            values[currency] = round(values.get(currency, 0.0) + (value or 0.0), 2)
    return statuses, values


async def assert_overview_is_the_events(client: Client, since: float, until: float) -> None:
    statuses, values = await counted(client, since, until)
    for group_by in ("day", "eventName"):
        totals = (await overview(client, since, until, groupBy=group_by))["totals"]
        shown = {k: v for k, v in totals["conversions"].items() if v}
        assert shown == statuses, group_by
        assert {m["currency"]: m["value"] for m in totals["value"]} == values, group_by
    # And /metrics' deliveries per account, sink and status: kept on write, as if counted.
    joined = await db_rows(
        client,
        "SELECT e.account_id, d.sink, d.status, COUNT(*) FROM deliveries d"
        " JOIN events e ON e.pk = d.event_pk GROUP BY 1, 2, 3",
    )
    assert sorted((await store_of(client).outbox.stats())[1]) == sorted(joined)


async def settle_deliveries(client: Client, wanted: int, timeout_s: float = 5.0) -> None:
    """Wait until ``wanted`` deliveries are no longer pending."""
    for _ in range(int(timeout_s / 0.02)):
        ((done,),) = await db_rows(
            client, "SELECT COUNT(*) FROM deliveries WHERE status != 'pending'"
        )
        if done >= wanted:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {wanted} deliveries settled")


async def test_overview_matches_the_events_through_every_status_change(
    make_client: ClientFactory,
) -> None:
    """The hourly counts behind the overview and the deliveries counts behind /metrics equal
    a count of the events and deliveries after every way a status changes: duplicates,
    outcomes, a replay, an erasure, retention's scrub and deletion, a state reported late."""
    sink = Scripted()
    client = await make_client(plugins={"sinks": ["scripted", "log"]}, extra={"scripted": sink})
    store = store_of(client)
    now = time.time()
    since, until = now - 2 * 86400 + 1234, now + 60
    people = ["16505550101", "16505550102", "16505550103"]
    for i, phone in enumerate(people):
        await add_conversation(store, wa_id=phone, clid=f"clid-review-{i}")
    sink.outcomes.update({"ok-0": "delivered", "ok-1": "delivered", "bad-0": "failed"})

    def body(event_id: str, phone: str, at: float, **extra: Any) -> dict[str, Any]:
        return {
            "accountId": "acme",
            "eventName": "Purchase" if "value" in extra else "LeadSubmitted",
            "eventId": event_id,
            "phoneE164": "+" + phone,
            "eventTime": at,
            **extra,
        }

    bodies = [
        body("ok-0", people[0], now - 3600 * 30 - 7, value=10.25, currency="USD"),
        body("ok-1", people[0], now - 86400 - 1, value=3, currency="EUR"),
        body("bad-0", people[1], now - 3600 * 5, value=1.1, currency="USD"),
        body("wait-0", people[2], now - 10, value=2.5, currency="USD"),
        body("lead-0", people[2], now - 7200),
    ]
    # Each sent twice at once (one batch: a duplicate within it), then once more.
    answers = await asyncio.gather(
        *(client.post("/v1/whatsapp/conversions", json=b, headers=AUTH) for b in bodies * 2)
    )
    assert all(r.status in (200, 202) for r in answers)
    for b in bodies:
        await client.post("/v1/whatsapp/conversions", json=b, headers=AUTH)
    await settle_deliveries(client, 5 + 3)  # every log delivery, ok-0, ok-1, bad-0
    await assert_overview_is_the_events(client, since, until)

    # A replay makes bad-0 pending again (the sink retrying it, so that it stays pending while
    # the counts are compared); then it is delivered.
    sink.outcomes["bad-0"] = "retry"
    resp = await client.post(
        "/v1/whatsapp/replay", json={"accountId": "acme", "eventIds": ["bad-0"]}, headers=AUTH
    )
    assert (await resp.json())["requeued"] == 1
    await assert_overview_is_the_events(client, since, until)
    sink.outcomes["bad-0"] = "delivered"
    await settle_deliveries(client, 5 + 3)
    await assert_overview_is_the_events(client, since, until)

    # An erasure cancels wait-0's pending delivery.
    resp = await client.delete(
        "/v1/whatsapp/users",
        headers=AUTH,
        params={"accountId": "acme", "phoneE164": "+" + people[2]},
    )
    assert resp.status == 200, await resp.text()
    await assert_overview_is_the_events(client, since, until)

    # Retention's scrub of conversations without a click (their events stay).
    await store.apply_retention(
        RetentionCutoffs(conversations=now + 10, clicks=0, delivered_events=0, failed_events=0),
        batch_rows=100,
    )
    await assert_overview_is_the_events(client, since, until)

    # Retention deleting the delivered events, and a sink's state reported for an event that
    # had none for it (an update that inserts).
    await store.apply_retention(
        RetentionCutoffs(conversations=0, clicks=0, delivered_events=now + 10, failed_events=0),
        batch_rows=100,
    )
    await assert_overview_is_the_events(client, since, until)
    lead = await store.find_event("acme", "lead-0")
    assert lead is not None
    await store.update_deliveries(lead.pk, {"extra": SinkState(status="failed", error="x")})
    await assert_overview_is_the_events(client, since, until)


HOUR, DAY = 3600, 86400


def stored(
    event_id: str,
    at: int,
    *,
    custom: Any = ...,
    status: str = "delivered",
    name: str = "Purchase",
    body: dict[str, Any] | None = None,
    payload: dict[str, Any] | None = None,
    test_event_code: str | None = None,
    expired: bool = False,
    conversation_id: str = "conv_review",
) -> StoredEvent:
    """A finished CTWA event as the pipeline stores it."""
    event = body or {
        "event_name": name,
        "event_id": event_id,
        "action_source": "business_messaging",
        "messaging_channel": "whatsapp",
        "event_time": at,
        "user_data": {"whatsapp_business_account_id": "102290129340398", "ctwa_clid": "c"},
    }
    if custom is not ...:
        event["custom_data"] = custom
    return StoredEvent(
        pk=0,
        account_id="acme",
        event_id=event_id,
        event_name=name,
        conversation_id=conversation_id,
        event_time=at,
        status=status,
        event=event,
        test_event_code=test_event_code,
        received_at=time.time(),
        duration_ms=1.0,
        deliveries={"meta_capi": SinkState(status=status, payload=payload)},  # type: ignore[arg-type]
        attribution_window_expired=expired,
    )


async def by_day(client: Client, since: int, until: int) -> dict[str, int]:
    """The period's events by UTC day, straight from the events."""
    rows = await db_rows(
        client,
        "SELECT event_time FROM events WHERE account_id = 'acme' AND event_time >= ?"
        " AND event_time < ?",
        since,
        until,
    )
    days: dict[str, int] = {}
    for (at,) in rows:
        day = time.strftime("%Y-%m-%d", time.gmtime(at))
        days[day] = days.get(day, 0) + 1
    return days


async def test_period_edges_and_days_agree_with_the_events(client: Client) -> None:
    store = store_of(client)
    midnight = (int(time.time()) // DAY - 2) * DAY
    times = [
        midnight - HOUR - 1, midnight - HOUR, midnight - 1, midnight, midnight + 1,
        midnight + HOUR - 1, midnight + HOUR, midnight + 90 * 60, midnight + DAY - 1,
        midnight + DAY, midnight + DAY + 59,
    ]  # fmt: skip
    for i, at in enumerate(times):
        await store.insert_event(
            stored(f"edge-{i}", at, custom={"currency": "USD", "value": 1.0}, expired=i % 3 == 0)
        )
    edges = sorted({*times, *(t + 1 for t in times), midnight - DAY, midnight + 2 * DAY})
    for since in edges:
        for until in edges:
            if since >= until:
                continue
            answer = await overview(client, since, until)
            days = {d["day"]: sum(d["conversions"].values()) for d in answer["days"]}
            expected = await by_day(client, since, until)
            assert {d: n for d, n in days.items() if n} == expected, (
                since - midnight,
                until - midnight,
            )
            assert answer["totals"]["events"] == sum(expected.values())
            ((within,),) = await db_rows(
                client,
                "SELECT COUNT(*) - COALESCE(SUM(attribution_window_expired), 0) FROM events"
                " WHERE event_time >= ? AND event_time < ?",
                since,
                until,
            )
            assert answer["totals"]["withinWindow"] == within


# -- findings ------------------------------------------------------------------------------


async def test_a_pruned_event_counts_the_same_whatever_the_periods_alignment(
    client: Client,
) -> None:
    """A pruned event counts nowhere: a period starting on the hour (read from event_hours)
    and one starting a second later (its first partial hour read from the events) agree."""
    store = store_of(client)
    hour = (int(time.time()) // HOUR - 5) * HOUR
    await store.insert_event(
        stored("pruned-1", hour + 1800, custom={"currency": "USD", "value": 4.0})
    )
    await store.apply_retention(
        RetentionCutoffs(
            conversations=0, clicks=0, delivered_events=time.time() + 10, failed_events=0
        ),
        batch_rows=100,
    )
    on_the_hour = (await overview(client, hour, hour + 2 * HOUR))["totals"]
    a_second_later = (await overview(client, hour + 1, hour + 2 * HOUR))["totals"]
    assert on_the_hour["events"] == a_second_later["events"]
    assert on_the_hour["value"] == a_second_later["value"]


async def test_a_negative_zero_value_is_read_back_as_stored(client: Client) -> None:
    """-0.0 reads back as -0.0, in what Meta is sent too (a REAL column would lose its sign,
    so such a value stays in the stored event)."""
    store = store_of(client)
    new = stored("neg-zero", int(time.time()), custom={"currency": "USD", "value": -0.0},
                 status="pending")  # fmt: skip
    await store.insert_event(new)
    found = await store.find_event("acme", "neg-zero")
    assert found is not None
    encode = msgspec.json.encode
    assert encode(found.event) == encode(new.event)
    (queued,) = await store.outbox.claim(
        "meta_capi", owner="test", now=time.time() + 10, lease_s=10, limit=10
    )
    assert encode(queued.event) == encode(new.event)


async def test_a_nan_value_set_by_a_plugin_does_not_make_the_event_unstorable(
    client: Client,
) -> None:
    """A NaN value (a normalizer plugin's doing; the API refuses non-finite values) is stored
    and read back: it is counted without a value, and kept in the stored event."""
    store = store_of(client)
    new = stored("nan-1", int(time.time()), custom={"currency": "USD", "value": float("nan")})
    await store.insert_event(new)
    found = await store.find_event("acme", "nan-1")
    assert found is not None
    assert "custom_data" in found.event


@pytest.mark.sqlite_only(
    "upgrades a SQLite store written before the reporting columns; PostgreSQL's schema starts"
    " with them"
)
async def test_the_backfill_reads_values_as_the_insert_does(
    make_client: ClientFactory, config: dict[str, Any], db_path: Path
) -> None:
    """The migration reads old events' values and currencies as the insert does (a JSON
    true, a numeric currency or a string value are not a value or a currency): an event
    counts the same whenever it was stored."""
    now = int(time.time()) - 60
    bodies = {
        "bool": b'{"custom_data":{"currency":"EUR","value":true}}',
        "numeric-currency": b'{"custom_data":{"currency":840,"value":2.0}}',
        "text-value": b'{"custom_data":{"currency":"GBP","value":"12.5"}}',
    }
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
        for version, script in enumerate(MIGRATIONS[:6], start=1):
            conn.executescript(script)
            conn.execute("INSERT INTO schema_migrations VALUES (?)", (version,))
        for event_id, blob in bodies.items():
            conn.execute(
                "INSERT INTO events (account_id, event_id, event_name, conversation_id,"
                " event_time, status, event, received_at, duration_ms, insert_token)"
                " VALUES ('acme', ?, 'Purchase', 'conv_old', ?, 'delivered', ?, ?, 1.0, '')",
                (event_id, now, blob, now),
            )
    client = await make_client(settings=parse_settings(config))
    store = store_of(client)
    for event_id, blob in bodies.items():
        await store.insert_event(
            stored(f"new-{event_id}", now, custom=json.loads(blob)["custom_data"])
        )
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute(
            "SELECT event_id, custom_value, custom_currency FROM events ORDER BY pk"
        ).fetchall()
    old = {event_id: (value, currency) for event_id, value, currency in rows[:3]}
    new = {event_id[4:]: (value, currency) for event_id, value, currency in rows[3:]}
    assert old == new


EMAIL = "Sentinel.Person@Leak-Check.example"
PHONE = "+1 650 555 0199"


def test_an_exception_groups_messages_are_scrubbed(logs: LogCapture) -> None:
    """The messages of an exception group's members (a plugin's asyncio.TaskGroup) are
    scrubbed like the group's own."""
    try:
        raise ExceptionGroup("lookups failed", [LookupError(f"no CRM customer {EMAIL} {PHONE}")])
    except ExceptionGroup:
        structlog.get_logger().exception("careless_group")
    (line,) = logs.events("careless_group")
    assert "LookupError" in json.dumps(line["exception"])
    assert EMAIL not in logs.text
    assert PHONE not in logs.text


def test_an_exc_info_tuple_is_rendered(logs: LogCapture) -> None:
    """An ``exc_info=(type, value, traceback)`` tuple is rendered (before redaction, which
    would turn it into a list the renderer does not recognise)."""
    try:
        raise LookupError("no customer")
    except LookupError as exc:
        caught = exc
    structlog.get_logger().error(
        "with_tuple", exc_info=(type(caught), caught, caught.__traceback__)
    )
    (line,) = logs.events("with_tuple")
    assert "LookupError" in json.dumps(line.get("exception"))


def test_plugin_bound_contextvars_are_merged_and_redacted(logs: LogCapture) -> None:
    """structlog contextvars a plugin binds reach the fused line, sensitive keys
    redacted, with the request's own fields."""
    start_request_log(request_id="req-review")
    tokens = structlog.contextvars.bind_contextvars(phone=PHONE, crm="hubspot")
    try:
        structlog.get_logger().info("plugin_line", nested={"x": [{"Email": EMAIL}]})
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
    (line,) = logs.events("plugin_line")
    assert line["request_id"] == "req-review"
    assert line["crm"] == "hubspot"
    assert line["phone"] == "[redacted]"
    assert line["nested"] == {"x": [{"Email": "[redacted]"}]}
    assert line["level"] == "info"
    assert EMAIL not in logs.text
    assert PHONE not in logs.text


def test_the_request_line_redacts_whatever_the_request_bound(
    logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The canonical line skips the redaction walk only when it holds the gateway's own plain
    fields: a sensitive key bound to the request, or a container under a plain key, is still
    redacted there."""
    # As in a server where nothing binds structlog's contextvars (the line's fast path).
    monkeypatch.setattr(structlog.contextvars, "_CONTEXT_VARS", {})
    start_request_log(request_id="req-line")
    bind(email=EMAIL)
    log_request(method="POST", route="/r", status=200, duration_ms=1.0)
    start_request_log(request_id="req-line-2")
    bind(account={"phone": PHONE})
    log_request(method="POST", route="/r", status=200, duration_ms=1.0)
    first, second = logs.events("request")
    assert first["email"] == "[redacted]"
    assert second["account"] == {"phone": "[redacted]"}
    assert (first["request_id"], second["request_id"]) == ("req-line", "req-line-2")
    assert EMAIL not in logs.text
    assert PHONE not in logs.text


def test_the_request_lines_fast_path_writes_what_the_whole_path_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(structlog.contextvars, "_CONTEXT_VARS", {})
    start_request_log(request_id="req-same", event_id="E1")
    bind(account="acme", event_status="dry_run", duplicate=False)
    fields = {"method": "POST", "route": "/r", "status": 200, "duration_ms": 1.5}
    line = JsonLine()
    fast = json.loads(line.request_line(fields))
    whole = json.loads(line(None, "info", {"event": "request", **fields}))
    stamps = fast.pop("timestamp"), whole.pop("timestamp")
    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
    assert list(fast.items()) == list(whole.items())


def test_the_request_line_keeps_its_name_whatever_is_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A plugin binding `event` must not rename the canonical line (found by review).
    monkeypatch.setattr(structlog.contextvars, "_CONTEXT_VARS", {})
    start_request_log(request_id="req-named")
    bind(event="plugin_step", account="acme")
    fields = {"method": "POST", "route": "/r", "status": 200, "duration_ms": 1.5}
    line = JsonLine()
    assert json.loads(line.request_line(fields))["event"] == "request"
    assert json.loads(line(None, "info", {"event": "request", **fields}))["event"] == "request"


async def test_every_answer_names_the_gateway_not_aiohttp(client: Client) -> None:
    """Every answer names the gateway, not Python and aiohttp, those made before the
    middleware (aiohttp's Expect handler's 417) included."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /nope HTTP/1.1\r\nHost: x\r\nExpect: bogus\r\nConnection: close\r\n\r\n")
    await writer.drain()
    head = (await asyncio.wait_for(reader.read(65536), 5)).split(b"\r\n\r\n")[0]
    writer.close()
    assert b"417" in head.split(b"\r\n")[0]
    assert b"Server: ctwa-gateway" in head.split(b"\r\n")


async def test_a_failing_batch_retried_op_by_op_counts_each_event_once(client: Client) -> None:
    """a batch with one write that fails is rolled back and each write retried
    alone; the others' hourly counts are added once."""
    store = store_of(client)
    at = (int(time.time()) // HOUR - 3) * HOUR + 10
    news = [stored(f"batch-{i}", at, custom={"currency": "USD", "value": 1.5}) for i in range(4)]
    # A write the store refuses (events.conversation_id is NOT NULL).
    bad = msgspec.structs.replace(stored("batch-bad", at), conversation_id=None)
    batch = [*news[:2], bad, *news[2:], news[0]]  # and a duplicate within the batch
    results = await asyncio.gather(*(store.insert_event(n) for n in batch), return_exceptions=True)
    assert [isinstance(r, Exception) for r in results] == [False, False, True, False, False, False]
    hours = await db_rows(client, "SELECT SUM(events), SUM(value) FROM event_hours")
    assert hours == [(4, 6.0)]
    totals = (await overview(client, at - HOUR, at + HOUR))["totals"]
    assert totals["events"] == 4


async def test_scrubbing_a_compact_event_keeps_what_meta_is_sent(client: Client) -> None:
    """retention's scrub rewrites the compact body (an integer value's 0 marker
    and all); custom_data reads back as stored, with the int value, the queued copy too."""
    store = store_of(client)
    conversation = await add_conversation(store, wa_id="16505550177", clid=None)
    now = int(time.time())
    new = stored(
        "scrubbed-1", now, custom={"currency": "USD", "value": 5},
        conversation_id=conversation.id, status="delivered",
        payload=None,
    )  # fmt: skip
    await store.insert_event(new)
    await store.apply_retention(
        RetentionCutoffs(conversations=now + 10, clicks=0, delivered_events=0, failed_events=0),
        batch_rows=100,
    )
    found = await store.find_event("acme", "scrubbed-1")
    assert found is not None
    assert "ctwa_clid" not in found.event["user_data"]
    assert msgspec.json.encode(found.event["custom_data"]) == b'{"currency":"USD","value":5}'


@pytest.mark.sqlite_only("how the sqlite3 module binds parameters")
async def test_sqlite_binds_none_bytes_and_bools_as_the_same_sql_values(tmp_path: Path) -> None:
    # The writer binds None as a NaN, bytes as a bytearray and a bool as its int
    # (gateway.store.sql.bindable: the sqlite3 module adapts the others slowly). Each must
    # still store what it stood for: NULL, a BLOB, an INTEGER, and match in comparisons.
    from gateway.store.sql import SqliteTx, run_sync

    conn = sqlite3.connect(tmp_path / "bind.sqlite3", isolation_level=None)
    conn.execute("CREATE TABLE t (a, b, c, d REAL, e TEXT)")
    tx = SqliteTx(conn)
    row = (None, b"\x00blob", True, None, None)
    run_sync(tx.execute("INSERT INTO t VALUES (?, ?, ?, ?, ?)", row))
    run_sync(tx.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)", [row]))
    stored = conn.execute(
        "SELECT a, typeof(a), b, typeof(b), c, typeof(c), typeof(d), typeof(e) FROM t"
    ).fetchall()
    assert stored == [(None, "null", b"\x00blob", "blob", 1, "integer", "null", "null")] * 2
    found = run_sync(tx.fetch("SELECT count(*) FROM t WHERE a IS ? AND b = ? AND c = ?", row[:3]))
    assert found == [(2,)]
