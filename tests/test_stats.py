"""The reporting API over HTTP: exact numbers from a seeded store, scoping, bad parameters,
the filtered events list, health and replay."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import parse_settings
from gateway.store.schema import MIGRATIONS
from tests.conftest import (
    AUTH,
    SCOPED_KEY,
    ClientFactory,
    add_conversation,
    db_rows,
    store_of,
)
from tests.console_http import signed_in
from tests.console_seed import ACME_TOTALS
from tests.store_sql import db_execute

# Run on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_ENGINES = True

Client = TestClient[web.Request, web.Application]
SCOPED = {"Authorization": f"Bearer {SCOPED_KEY}"}


async def stats(client: Client, **params: str) -> dict[str, Any]:
    resp = await client.get(
        "/v1/whatsapp/stats", params={"accountId": "acme", **params}, headers=AUTH
    )
    assert resp.status == 200, await resp.text()
    answer: dict[str, Any] = await resp.json()
    return answer


async def test_overview_totals_and_days_are_the_seeded_numbers(seeded: Client) -> None:
    answer = await stats(seeded)
    assert answer["groupBy"] == "day"
    assert answer["totals"] == ACME_TOTALS
    days = answer["days"]
    assert len(days) in (7, 8)  # the period touches 7 or 8 UTC days
    assert sum(d["clicks"] for d in days) == 4
    assert sum(d["conversations"] for d in days) == 5
    assert sum(d["conversions"]["delivered"] for d in days) == 2
    # Only the last 24 hours: b1's click (a day ago, minus a little) is out, its event in.
    recent = await stats(seeded, since="2000-01-01", until="2000-01-02")
    assert recent["totals"]["events"] == 0
    assert recent["totals"]["withinWindowShare"] is None


async def test_ads_funnel_is_the_seeded_numbers(seeded: Client) -> None:
    ads = {row["adId"]: row for row in (await stats(seeded, groupBy="ad"))["ads"]}
    assert set(ads) == {"120000000000000001", "120000000000000002", "120000000000000003", None}
    summer = ads["120000000000000001"]
    assert summer["headline"] == "Summer sale"
    assert summer["sourceUrl"] == "https://fb.me/summer"
    assert (summer["clicks"], summer["conversations"], summer["converted"]) == (2, 2, 2)
    assert summer["conversionRate"] == 1.0
    assert summer["events"] == 3
    assert summer["byEventName"] == {"LeadSubmitted": 1, "Purchase": 2}
    assert summer["value"] == [{"currency": "USD", "value": 50.0}]
    # a1 converted 1 h after its click, a2 3 h after: the median is 2 h.
    assert summer["medianClickToConversionS"] == 7200.0
    assert summer["conversions"] == {
        "delivered": 2, "failed": 1, "pending": 0, "expired": 0, "dryRun": 0
    }  # fmt: skip
    organic = ads[None]
    assert (organic["clicks"], organic["conversations"], organic["events"]) == (0, 1, 0)
    assert organic["conversionRate"] == 0.0
    assert organic["medianClickToConversionS"] is None
    assert ads["120000000000000002"]["value"] == [{"currency": "EUR", "value": 25.5}]


async def test_by_event_name(seeded: Client) -> None:
    rows = (await stats(seeded, groupBy="eventName"))["eventNames"]
    assert [(r["eventName"], r["events"]) for r in rows] == [("LeadSubmitted", 1), ("Purchase", 4)]


async def test_a_scoped_key_sees_only_its_account(seeded: Client) -> None:
    resp = await seeded.get("/v1/whatsapp/stats", params={"accountId": "acme"}, headers=SCOPED)
    assert resp.status == 403
    assert (await resp.json())["code"] == "account_not_allowed"
    resp = await seeded.get("/v1/whatsapp/stats", params={"accountId": "other"}, headers=SCOPED)
    other = await resp.json()
    assert other["totals"]["events"] == 1
    assert other["totals"]["value"] == [{"currency": "USD", "value": 999.0}]
    for path in ("/v1/whatsapp/health", "/v1/whatsapp/conversions"):
        resp = await seeded.get(path, params={"accountId": "acme"}, headers=SCOPED)
        assert resp.status == 403
    resp = await seeded.post(
        "/v1/whatsapp/replay", json={"accountId": "acme", "dryRun": True}, headers=SCOPED
    )
    assert resp.status == 403


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-01"}, "until"),
        ({"since": "2026-11-24T10:00:00"}, "since"),  # no zone
        ({"since": "2026-11-25", "until": "2026-11-24"}, "since"),
        ({"since": "2020-01-01", "until": "2026-01-01"}, "since"),  # too long
        ({"groupBy": "week"}, "groupBy"),
        ({"since": "9999-12-31T23:59:59+00:00"}, "since"),
    ],
)
async def test_bad_parameters_are_400_naming_them(
    seeded: Client, params: dict[str, str], param: str
) -> None:
    resp = await seeded.get(
        "/v1/whatsapp/stats", params={"accountId": "acme", **params}, headers=AUTH
    )
    assert resp.status == 400
    body = await resp.json()
    assert body["param"] == param
    assert body["type"] == "invalid_request_error"
    assert body["error"]


async def test_events_list_filters(seeded: Client) -> None:
    async def ids(**params: str) -> list[str]:
        resp = await seeded.get(
            "/v1/whatsapp/conversions", params={"accountId": "acme", **params}, headers=AUTH
        )
        assert resp.status == 200, await resp.text()
        return [e["eventId"] for e in (await resp.json())["events"]]

    assert await ids(status="failed") == ["order-a1-2"]
    assert await ids(eventName="LeadSubmitted") == ["lead-a2"]
    assert sorted(await ids(adId="120000000000000001")) == ["lead-a2", "order-a1-1", "order-a1-2"]
    assert await ids(since="2000-01-01", until="2000-01-02") == []
    assert len(await ids()) == 5
    resp = await seeded.get(
        "/v1/whatsapp/conversions", params={"accountId": "acme", "status": "lost"}, headers=AUTH
    )
    assert resp.status == 400
    assert (await resp.json())["param"] == "status"


async def test_health(seeded: Client) -> None:
    resp = await seeded.get("/v1/whatsapp/health", params={"accountId": "acme"}, headers=AUTH)
    answer = await resp.json()
    assert answer["outbox"] == [
        {
            "sink": "meta_capi",
            "pending": 1,
            "oldestPendingAgeS": pytest.approx(86400 - 7200, abs=60),
        }
    ]
    assert answer["webhooks"] == {"accountProblems": 0, "partial": 0, "pending": 0}
    assert answer["storeBytes"] > 0
    resp = await seeded.get("/v1/whatsapp/health", params={"accountId": "other"}, headers=SCOPED)
    scoped = await resp.json()
    assert scoped["storeBytes"] is None  # store-wide figures: keys for every account only
    assert scoped["webhooks"]["partial"] is None


async def test_replay_counts_then_requeues(seeded: Client) -> None:
    body = {"accountId": "acme", "status": ["failed", "expired"], "dryRun": True}
    resp = await seeded.post("/v1/whatsapp/replay", json=body, headers=AUTH)
    assert await resp.json() == {
        "matched": 2,
        "requeued": 0,
        "dryRun": True,
        "sinks": ["meta_capi"],
    }
    resp = await seeded.post(
        "/v1/whatsapp/replay",
        json={"accountId": "acme", "eventIds": ["order-a1-2"]},
        headers=AUTH,
    )
    assert (await resp.json())["requeued"] == 1
    detail = await (
        await seeded.get(
            "/v1/whatsapp/conversions/order-a1-2", params={"accountId": "acme"}, headers=AUTH
        )
    ).json()
    assert detail["status"] == "pending"
    # The overview's hourly counts moved with it.
    moved = (await stats(seeded))["totals"]["conversions"]
    assert (moved["failed"], moved["pending"]) == (0, 2)
    resp = await seeded.post(
        "/v1/whatsapp/replay", json={"accountId": "acme", "status": ["delivered"]}, headers=AUTH
    )
    assert resp.status == 400
    assert (await resp.json())["param"] == "status[0]"
    # An event id with a control character matches nothing stored: refused, like on insert.
    resp = await seeded.post(
        "/v1/whatsapp/replay", json={"accountId": "acme", "eventIds": ["a\nb"]}, headers=AUTH
    )
    assert resp.status == 400
    assert (await resp.json())["param"] == "eventIds[0]"


@pytest.mark.sqlite_only(
    "upgrades a SQLite store written before the reporting columns; PostgreSQL's schema starts"
    " with them"
)
async def test_events_stored_before_the_reporting_columns_are_counted(
    make_client: ClientFactory, config: dict[str, Any], db_path: Path
) -> None:
    """A store written by the version before the console: upgrading fills the value,
    currency and day of its events from the stored Meta event, so the overview counts them."""
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
        for version, script in enumerate(MIGRATIONS[:6], start=1):
            conn.executescript(script)
            conn.execute("INSERT INTO schema_migrations VALUES (?)", (version,))
        now = int(time.time())
        conn.execute(
            "INSERT INTO events (account_id, event_id, event_name, conversation_id, event_time,"
            " status, event, received_at, duration_ms, insert_token)"
            " VALUES ('acme', 'OLD-1', 'Purchase', 'conv_old', ?, 'delivered', ?, ?, 1.0, '')",
            (now, b'{"custom_data":{"currency":"EUR","value":12.5}}', now),
        )
    client = await make_client(settings=parse_settings(config))
    totals = (await stats(client))["totals"]
    assert totals["events"] == 1
    assert totals["value"] == [{"currency": "EUR", "value": 12.5}]


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


async def test_a_period_counts_exactly_its_events_to_the_second(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    """Whole hours are counted from the hourly table, the partial hours at either end from
    the events themselves: a period that starts and ends mid-hour counts exactly what lies
    inside it, and a period within one hour too."""
    client = await make_client(settings=parse_settings(config))
    store = store_of(client)
    start = (int(time.time()) // 3600 - 30) * 3600 + 1234  # mid-hour, 30 hours ago
    await add_conversation(store, wa_id="16505550100", clid="clid-period")
    times = [start - 1, start, start + 3600, start + 7 * 3600 + 10, start + 9 * 3600 - 1]
    for i, at in enumerate(times):
        resp = await client.post(
            "/v1/whatsapp/conversions",
            json={
                "accountId": "acme",
                "eventName": "Purchase",
                "eventId": f"period-{i}",
                "phoneE164": "+16505550100",
                "eventTime": at,
                "value": 10,
                "currency": "USD",
            },
            headers=AUTH,
        )
        assert resp.status in (200, 202), await resp.text()
    until = start + 9 * 3600 - 1  # excluded
    answer = await stats(client, since=iso(start), until=iso(until))
    assert answer["totals"]["events"] == 3
    assert answer["totals"]["value"] == [{"currency": "USD", "value": 30.0}]
    names = await stats(client, since=iso(start), until=iso(until), groupBy="eventName")
    assert names["totals"]["events"] == 3
    within_an_hour = await stats(client, since=iso(start), until=iso(start + 60))
    assert within_an_hour["totals"]["events"] == 1


async def test_pruned_events_leave_the_counts(seeded: Client) -> None:
    """A deleted event (retention) leaves the hourly counts too: the overview counts what the
    events list can show (the daily history, event_daily, keeps the totals)."""
    assert (await stats(seeded))["totals"]["events"] == 5
    assert await db_execute(seeded, "DELETE FROM deliveries") > 0
    assert await db_execute(seeded, "DELETE FROM events") >= 5
    totals = (await stats(seeded))["totals"]
    assert (totals["events"], totals["value"]) == (0, [])


async def test_test_events_are_no_conversions(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    """Found by review: events sent with a test event code (Meta's Test Events tool, which
    counts them nowhere) were counted as conversions, with their value, in every number of
    the stats and the console. They are left out of each, and said apart."""
    client = await make_client(settings=parse_settings(config))
    store = store_of(client)
    real = await add_conversation(store, wa_id="16505550100", clid="clid-real")
    tried = await add_conversation(store, wa_id="16505550101", clid="clid-tried")
    now = int(time.time())
    # Hours ago (counted from the hourly table) and now (from the events themselves).
    sent = [
        ("real-1", real.id, now - 3 * 3600, None),
        ("real-2", real.id, now, None),
        ("test-1", tried.id, now - 3 * 3600, "TEST123"),
        ("test-2", real.id, now, "TEST123"),
    ]
    for event_id, conversation_id, at, code in sent:
        body: dict[str, Any] = {
            "accountId": "acme",
            "eventName": "Purchase",
            "eventId": event_id,
            "conversationId": conversation_id,
            "eventTime": at,
            "value": 10 if code is None else 999,
            "currency": "USD",
        }
        if code is not None:
            body["testCode"] = code
        resp = await client.post("/v1/whatsapp/conversions", json=body, headers=AUTH)
        assert resp.status in (200, 202), await resp.text()
    totals = (await stats(client))["totals"]
    assert totals["events"] == 2
    assert totals["value"] == [{"currency": "USD", "value": 20.0}]
    assert totals["withinWindow"] == 2
    assert totals["testEvents"] == 2
    days = (await stats(client))["days"]
    assert sum(d["conversions"]["dryRun"] for d in days) == 2
    names = (await stats(client, groupBy="eventName"))["eventNames"]
    assert [(n["eventName"], n["events"], n["value"]) for n in names] == [
        ("Purchase", 2, [{"currency": "USD", "value": 20.0}])
    ]
    (ad,) = (await stats(client, groupBy="ad"))["ads"]
    assert (ad["conversations"], ad["converted"], ad["events"]) == (2, 1, 2)
    assert ad["byEventName"] == {"Purchase": 2}
    # A pruned test event takes nothing away from the real ones.
    (pk,) = (await db_rows(client, "SELECT pk FROM events WHERE event_id = 'test-1'"))[0]
    await db_execute(client, "DELETE FROM delivery_attempts WHERE event_pk = ?", pk)
    await db_execute(client, "DELETE FROM deliveries WHERE event_pk = ?", pk)
    await db_execute(client, "DELETE FROM events WHERE pk = ?", pk)
    totals = (await stats(client))["totals"]
    assert (totals["events"], totals["testEvents"]) == (2, 1)
    # The console's overview shows the same numbers, and says what it left out.
    await signed_in(client)
    page = await client.get("/console/accounts/acme/overview")
    html = await page.text()
    assert page.status == 200
    assert '<p class="big" data-stat="events">2</p>' in html
    assert "Not counted: 1 test event " in html


@pytest.mark.sqlite_only("upgrades a SQLite store; PostgreSQL's is in test_pg_schema.py")
async def test_test_events_counted_before_the_upgrade_are_taken_away(
    make_client: ClientFactory, config: dict[str, Any], db_path: Path
) -> None:
    """A store at the version before: its hourly counts included test events; upgrading
    takes them away, and the real ones stay."""
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
        for version, script in enumerate(MIGRATIONS[:10], start=1):
            conn.executescript(script)
            conn.execute("INSERT INTO schema_migrations VALUES (?)", (version,))
        hour = int(time.time()) // 3600 - 3
        for event_id, code, value in (("OLD-1", None, 12.5), ("OLD-T", "TEST9", 100.0)):
            conn.execute(
                "INSERT INTO events (account_id, event_id, event_name, conversation_id,"
                " event_time, status, event, test_event_code, received_at, duration_ms,"
                " insert_token, custom_value, custom_currency) VALUES ('acme', ?, 'Purchase',"
                " 'conv_old', ?, 'delivered', x'7b7d', ?, ?, 1.0, '', ?, 'EUR')",
                (event_id, hour * 3600 + 60, code, hour * 3600, value),
            )
        # As the version before counted them: both.
        conn.execute(
            "INSERT INTO event_hours VALUES ('acme', ?, 'Purchase', 'delivered', 'EUR', 0, 2,"
            " 112.5)",
            (hour,),
        )
    client = await make_client(settings=parse_settings(config))
    totals = (await stats(client))["totals"]
    assert totals["events"] == 1
    assert totals["value"] == [{"currency": "EUR", "value": 12.5}]
    assert totals["testEvents"] == 1
