"""The conversions API through the real app: answers, idempotency, history, auth and errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import (
    AUTH,
    CLID,
    SCOPED_KEY,
    WABA_ID,
    ClientFactory,
    add_conversation,
    store_of,
)

# Run on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_ENGINES = True

Client = TestClient[web.Request, web.Application]
URL = "/v1/whatsapp/conversions"


def purchase(conversation_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "accountId": "acme",
        "eventName": "Purchase",
        "eventId": "order-991",
        "conversationId": conversation_id,
        "value": 49.99,
        "currency": "usd",
        "contentIds": ["sku-1"],
        "email": "  John_Smith@gmail.com ",
        "externalId": "CUST-42",
        "testCode": "TEST123",
        **extra,
    }


async def test_purchase_dry_run_answers_with_the_exact_meta_payload(client: Client) -> None:
    conversation = await add_conversation(store_of(client))
    before = int(time.time())

    resp = await client.post(URL, json=purchase(conversation.id), headers=AUTH)

    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["platform"] == "metaads"
    assert body["eventsFailed"] == 0
    assert body["failures"] == []
    assert body["eventId"] == "order-991"
    assert body["status"] == "dry_run"
    assert body["duplicate"] is False
    assert body["conversationId"] == conversation.id
    assert body["deliveries"] == [
        {"sink": "log", "status": "dry_run", "attempts": 0, "error": None, "traceId": None}
    ]
    payload = body["payload"]
    event = payload["data"][0]
    assert before <= event.pop("event_time") <= int(time.time())
    assert payload == {
        "data": [
            {
                "event_name": "Purchase",
                "event_id": "order-991",
                "action_source": "business_messaging",
                "messaging_channel": "whatsapp",
                "user_data": {
                    "whatsapp_business_account_id": WABA_ID,
                    "ctwa_clid": CLID,
                    "em": "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f",
                    "external_id": hashlib.sha256(b"cust-42").hexdigest(),
                },
                "custom_data": {"currency": "USD", "value": 49.99, "content_ids": ["sku-1"]},
            }
        ],
        "partner_agent": "ctwa-gateway",
        "test_event_code": "TEST123",
    }


async def test_a_negative_zero_value_is_sent_as_zero(client: Client) -> None:
    # -0.0 passes JSON and the value's check (>= 0); Meta is sent no sign (review finding).
    conversation = await add_conversation(store_of(client))
    body = json.dumps(purchase(conversation.id, eventId="neg-zero")).replace("49.99", "-0.0")
    resp = await client.post(URL, data=body, headers={**AUTH, "Content-Type": "application/json"})
    text = await resp.text()
    assert resp.status == 200, text
    assert '"value":0.0' in text
    assert "-0.0" not in text


async def test_event_time_is_kept_as_integer_seconds(client: Client) -> None:
    conversation = await add_conversation(store_of(client))
    when = time.time() - 3600.7
    resp = await client.post(URL, json=purchase(conversation.id, eventTime=when), headers=AUTH)
    body = await resp.json()
    assert body["payload"]["data"][0]["event_time"] == int(when)


async def test_phone_resolves_the_latest_conversation_with_a_click(client: Client) -> None:
    store = store_of(client)
    old = await add_conversation(
        store, clid="old-click", last_inbound_at=time.time() - 7200, superseded_by="conv_n"
    )
    new = await add_conversation(
        store, clid="new-click", last_inbound_at=time.time() - 60, superseded_by="conv_l"
    )
    # More recent, but without a click id: not attributable, so not chosen.
    await add_conversation(store, clid=None, last_inbound_at=time.time())
    # Another account's conversation for the same phone is never used.
    await add_conversation(store, account_id="other", clid="other-click")

    resp = await client.post(
        URL,
        json={
            "accountId": "acme",
            "eventName": "LeadSubmitted",
            "eventId": "lead-1",
            "phoneE164": "+1 650-555-1234",
        },
        headers=AUTH,
    )

    body = await resp.json()
    assert resp.status == 200, body
    assert body["conversationId"] == new.id != old.id
    assert body["payload"]["data"][0]["user_data"]["ctwa_clid"] == "new-click"


async def test_conversation_id_wins_over_phone(client: Client) -> None:
    store = store_of(client)
    by_id = await add_conversation(store, wa_id="447911123456", clid="by-id")
    await add_conversation(store, clid="by-phone")
    resp = await client.post(URL, json=purchase(by_id.id, phoneE164="16505551234"), headers=AUTH)
    body = await resp.json()
    assert body["payload"]["data"][0]["user_data"]["ctwa_clid"] == "by-id"


async def test_same_event_id_is_not_delivered_twice(client: Client, logs: Any) -> None:
    conversation = await add_conversation(store_of(client))
    first = await (await client.post(URL, json=purchase(conversation.id), headers=AUTH)).json()
    # The same body again, keys in another order and other whitespace: a retry.
    raw = json.dumps(dict(reversed(purchase(conversation.id).items())), indent=4).encode()
    resp = await client.post(URL, data=raw, headers={**AUTH, "Content-Type": "application/json"})
    again = await resp.json()
    assert resp.status == 200
    assert again["duplicate"] is True
    assert again["payload"] == first["payload"]
    assert len(logs.events("dry_run_payload")) == 1


async def test_a_reused_event_id_with_another_body_is_409_naming_the_fields(
    client: Client, logs: Any
) -> None:
    conversation = await add_conversation(store_of(client))
    await client.post(URL, json=purchase(conversation.id), headers=AUTH)
    changed = purchase(conversation.id, value=1.0, email="other@example.com")
    resp = await client.post(URL, json=changed, headers=AUTH)
    answer = await resp.json()
    assert (resp.status, answer["code"], answer["param"]) == (409, "event_id_reused", "email")
    assert answer["details"] == {"fields": ["email", "value"]}
    assert "other@example.com" not in json.dumps(answer)
    assert len(logs.events("dry_run_payload")) == 1  # nothing delivered


async def test_reused_event_ids_can_answer_the_original_as_zernio_does(
    make_client: ClientFactory,
) -> None:
    client = await make_client(events={"on_reused_event_id": "original"})
    conversation = await add_conversation(store_of(client))
    first = await (await client.post(URL, json=purchase(conversation.id), headers=AUTH)).json()
    resp = await client.post(URL, json=purchase(conversation.id, value=1.0), headers=AUTH)
    again = await resp.json()
    assert (resp.status, again["duplicate"]) == (200, True)
    assert (
        again["payload"]["data"][0]["custom_data"]["value"]
        == 49.99
        == (first["payload"]["data"][0]["custom_data"]["value"])
    )


async def test_concurrent_duplicates_store_one_event(client: Client, logs: Any) -> None:
    conversation = await add_conversation(store_of(client))
    responses = await asyncio.gather(
        *(client.post(URL, json=purchase(conversation.id), headers=AUTH) for _ in range(20))
    )
    bodies = [await r.json() for r in responses]
    assert all(r.status == 200 for r in responses)
    assert sum(not b["duplicate"] for b in bodies) == 1
    assert len(logs.events("dry_run_payload")) == 1
    events = await store_of(client).recent_events("acme", 50)
    assert [e.event_id for e in events] == ["order-991"]


async def test_event_ids_are_scoped_per_account(client: Client) -> None:
    store = store_of(client)
    acme = await add_conversation(store)
    other = await add_conversation(store, account_id="other")
    a = await client.post(URL, json=purchase(acme.id), headers=AUTH)
    b = await client.post(URL, json=purchase(other.id, accountId="other"), headers=AUTH)
    assert (await a.json())["duplicate"] is False
    assert (await b.json())["duplicate"] is False


async def test_history_lists_newest_first_in_zernio_shape(client: Client) -> None:
    conversation = await add_conversation(store_of(client))
    for i in range(3):
        resp = await client.post(URL, json=purchase(conversation.id, eventId=f"e{i}"), headers=AUTH)
        assert resp.status == 200

    resp = await client.get(URL, params={"accountId": "acme", "limit": "2"}, headers=AUTH)

    body = await resp.json()
    assert resp.status == 200
    assert [e["eventId"] for e in body["events"]] == ["e2", "e1"]
    row = body["events"][0]
    assert set(row) == {
        "timestamp",
        "eventName",
        "conversationId",
        "eventsReceived",
        "eventsFailed",
        "traceId",
        "durationMs",
        "eventId",
        "status",
        "attributionWindowExpired",
        "attempts",
        "error",
        "resolution",
    }
    assert row["resolution"] == {"resolver": "conversation_id", "field": "conversationId"}
    assert row["eventName"] == "Purchase"
    assert row["conversationId"] == conversation.id
    assert row["status"] == "dry_run"
    assert row["timestamp"].endswith("Z")
    assert row["durationMs"] >= 0
    empty = await client.get(URL, params={"accountId": "other"}, headers=AUTH)
    assert (await empty.json()) == {"events": []}


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({}, "accountId"),
        ({"accountId": "acme", "limit": "0"}, "limit"),
        ({"accountId": "acme", "limit": "201"}, "limit"),
        ({"accountId": "acme", "limit": "x"}, "limit"),
    ],
)
async def test_history_rejects_bad_queries(
    client: Client, params: dict[str, str], param: str
) -> None:
    resp = await client.get(URL, params=params, headers=AUTH)
    assert resp.status == 400
    assert (await resp.json())["param"] == param


async def assert_error(
    resp: Any, status: int, code: str, param: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = await resp.json()
    assert resp.status == status, body
    assert set(body) == {"error", "type", "code", "param", "details"}
    assert body["code"] == code
    assert body["param"] == param
    assert resp.headers["X-Request-Id"]
    return body


async def test_missing_key_is_401(client: Client) -> None:
    resp = await client.post(URL, json=purchase("c"))
    body = await assert_error(resp, 401, "missing_api_key")
    assert body["type"] == "authentication_error"
    assert body["error"].startswith("Unauthorized")


async def test_wrong_key_is_401(client: Client) -> None:
    resp = await client.post(URL, json=purchase("c"), headers={"Authorization": "Bearer nope"})
    await assert_error(resp, 401, "invalid_api_key")
    resp = await client.post(URL, json=purchase("c"), headers={"Authorization": "Basic abc"})
    await assert_error(resp, 401, "invalid_authorization")


async def test_key_not_allowed_for_account_is_403(client: Client) -> None:
    conversation = await add_conversation(store_of(client))
    headers = {"Authorization": f"Bearer {SCOPED_KEY}"}
    resp = await client.post(URL, json=purchase(conversation.id), headers=headers)
    body = await assert_error(resp, 403, "account_not_allowed", "accountId")
    assert body["type"] == "permission_error"
    history = await client.get(URL, params={"accountId": "acme"}, headers=headers)
    await assert_error(history, 403, "account_not_allowed", "accountId")
    # The scoped key still works for its own account.
    other = await add_conversation(store_of(client), account_id="other")
    ok = await client.post(URL, json=purchase(other.id, accountId="other"), headers=headers)
    assert ok.status == 200


async def test_unknown_account_is_404(client: Client) -> None:
    resp = await client.post(URL, json=purchase("c", accountId="nobody"), headers=AUTH)
    await assert_error(resp, 404, "account_not_found", "accountId")


async def test_unknown_conversation_is_404(client: Client) -> None:
    resp = await client.post(URL, json=purchase("conv_missing"), headers=AUTH)
    body = await assert_error(resp, 404, "conversation_not_found", "conversationId")
    assert "conv_missing" in body["error"]


async def test_another_accounts_conversation_is_404(client: Client) -> None:
    other = await add_conversation(store_of(client), account_id="other")
    resp = await client.post(URL, json=purchase(other.id), headers=AUTH)
    await assert_error(resp, 404, "conversation_not_found", "conversationId")


async def test_unknown_phone_is_404(client: Client) -> None:
    resp = await client.post(
        URL,
        json={
            "accountId": "acme",
            "eventName": "LeadSubmitted",
            "eventId": "x",
            "phoneE164": "447911123000",
        },
        headers=AUTH,
    )
    await assert_error(resp, 404, "conversation_not_found", "phoneE164")


async def test_conversation_without_click_is_422_in_zernio_words(client: Client) -> None:
    conversation = await add_conversation(store_of(client), clid=None)
    resp = await client.post(URL, json=purchase(conversation.id), headers=AUTH)
    body = await assert_error(resp, 422, "missing_ctwa_clid", "conversationId")
    assert body["error"] == "The resolved conversation has no captured ctwa_clid"
    assert body["details"] == {"conversationId": conversation.id, "resolver": "conversation_id"}
    # Nothing was stored: after a capture the same eventId must still go through.
    assert await store_of(client).find_event("acme", "order-991") is None


async def test_body_too_large_is_413(make_client: ClientFactory) -> None:
    client = await make_client(server={"max_body_bytes": 2048})
    big = purchase("c", contentIds=["x" * 200] * 20)
    resp = await client.post(URL, json=big, headers=AUTH)
    body = await assert_error(resp, 413, "payload_too_large")
    assert body["details"] == {"maxBodyBytes": 2048}


async def test_not_json_is_415(client: Client) -> None:
    resp = await client.post(
        URL,
        data="accountId=acme",
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    )
    body = await assert_error(resp, 415, "unsupported_media_type", "Content-Type")
    assert "application/json" in body["error"]


async def test_json_with_parameters_or_capitals_is_json(client: Client) -> None:
    """A Content-Type other than the exact ``application/json`` is parsed, not refused."""
    conversation = await add_conversation(store_of(client))
    for i, kind in enumerate(("Application/JSON", "application/json; charset=utf-8")):
        resp = await client.post(
            URL,
            data=json.dumps(purchase(conversation.id, eventId=f"typed-{i}")),
            headers={**AUTH, "Content-Type": kind},
        )
        assert resp.status == 200, await resp.text()


async def test_malformed_json_is_400(client: Client) -> None:
    resp = await client.post(
        URL, data=b'{"accountId": ', headers={**AUTH, "Content-Type": "application/json"}
    )
    body = await assert_error(resp, 400, "invalid_json")
    assert "not valid JSON" in body["error"]


async def test_non_utf8_and_wrong_shape_are_400(client: Client) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    resp = await client.post(URL, data=b'{"accountId": "\xff"}', headers=headers)
    await assert_error(resp, 400, "invalid_json")
    resp = await client.post(URL, data=b"[1, 2]", headers=headers)
    await assert_error(resp, 400, "invalid_body")


async def test_unknown_route_and_method(client: Client) -> None:
    await assert_error(await client.get("/v1/nope"), 404, "route_not_found")
    resp = await client.delete(URL, headers=AUTH)
    body = await assert_error(resp, 405, "method_not_allowed")
    assert body["details"]["allowed"] == ["GET", "HEAD", "POST"]
    assert resp.headers["Allow"] == "GET, HEAD, POST"


async def test_client_request_id_is_reused_and_a_bad_one_replaced(client: Client) -> None:
    resp = await client.get(
        URL, params={"accountId": "acme"}, headers={**AUTH, "X-Request-Id": "req-abc-12345"}
    )
    assert resp.headers["X-Request-Id"] == "req-abc-12345"
    resp = await client.get(
        URL, params={"accountId": "acme"}, headers={**AUTH, "X-Request-Id": "bad id\twith spaces"}
    )
    assert resp.headers["X-Request-Id"] != "bad id\twith spaces"
    assert len(resp.headers["X-Request-Id"]) == 32


async def test_canonical_line_per_request(client: Client, logs: Any) -> None:
    conversation = await add_conversation(store_of(client))
    await client.post(
        URL, json=purchase(conversation.id), headers={**AUTH, "X-Request-Id": "rid-12345678"}
    )
    lines = [line for line in logs.events("request") if line.get("request_id") == "rid-12345678"]
    assert len(lines) == 1
    line = lines[0]
    assert line["route"] == URL
    assert line["status"] == 200
    assert line["account"] == "acme"
    assert line["event_id"] == "order-991"
    assert line["duration_ms"] >= 0


async def test_a_retry_that_would_now_fail_still_gets_its_original_answer(
    make_client: ClientFactory,
) -> None:
    client = await make_client(events={"on_reused_event_id": "original"})
    conversation = await add_conversation(store_of(client))
    first = await (await client.post(URL, json=purchase(conversation.id), headers=AUTH)).json()
    # The retry names a conversation that does not exist (and a time Meta would now refuse):
    # it is still the same eventId, so the caller hears what happened the first time.
    retry = purchase("conv_gone", eventTime=time.time() - 30 * 86400)
    resp = await client.post(URL, json=retry, headers=AUTH)
    again = await resp.json()
    assert resp.status == 200, again
    assert again["duplicate"] is True
    assert again["conversationId"] == first["conversationId"]
    assert again["payload"] == first["payload"]


async def test_control_characters_in_the_url_are_a_400_or_a_404_on_either_engine(
    client: Client,
) -> None:
    """Nothing stored has a NUL, and PostgreSQL's text cannot even be asked about one: a query
    parameter with it is refused naming the parameter, an id in the path is not found."""
    resp = await client.get(
        "/v1/whatsapp/conversions",
        params={"accountId": "acme", "eventName": "Lead\u0000"},
        headers=AUTH,
    )
    body = await resp.json()
    assert (resp.status, body["param"]) == (400, "eventName"), body
    resp = await client.get("/v1/whatsapp/conversions/E%001?accountId=acme", headers=AUTH)
    assert (resp.status, (await resp.json())["code"]) == (404, "event_not_found")
    resp = await client.get("/v1/whatsapp/conversations/conv%00x", headers=AUTH)
    assert (resp.status, (await resp.json())["code"]) == (404, "conversation_not_found")
    resp = await client.get(
        "/v1/whatsapp/conversations",
        params={"accountId": "acme", "phoneE164": "+1650\u0000"},
        headers=AUTH,
    )
    assert resp.status == 400
