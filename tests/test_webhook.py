"""The WhatsApp webhook through the real app: handshake, signatures, capture rules, idempotency."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import (
    CLID,
    VERIFY_TOKEN,
    WABA_ID,
    ClientFactory,
    LogCapture,
    db_rows,
    store_of,
)
from tests.payloads import (
    automatic_change,
    encode,
    fixture,
    message,
    messages_change,
    notification,
    post_signed,
    referral,
    signed,
)

# Run on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_ENGINES = True

Client = TestClient[web.Request, web.Application]
URL = "/webhooks/whatsapp"
FIXTURE_WAMID = "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQUQ0N0VFMDA2MTQ0RkJFNkNDNAA="
DAY = 86400


# -- handshake ------------------------------------------------------------------------------


async def test_handshake_echoes_the_challenge(client: Client) -> None:
    params = {
        "hub.mode": "subscribe",
        "hub.verify_token": VERIFY_TOKEN,
        "hub.challenge": "1158201444",
    }
    resp = await client.get(URL, params=params)
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert await resp.text() == "1158201444"


@pytest.mark.parametrize(
    "params",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.challenge": "1"},
        {"hub.mode": "subscribe"},
        {},
    ],
    ids=["wrong token", "wrong mode", "no token", "no token nor challenge", "nothing"],
)
async def test_handshake_refusals_are_403(client: Client, params: dict[str, str]) -> None:
    resp = await client.get(URL, params=params)
    assert resp.status == 403
    assert (await resp.json())["code"] == "verification_failed"


@pytest.mark.parametrize("challenge", [None, "", "x" * 257])
async def test_a_handshake_with_the_token_but_no_usable_challenge_is_400(
    client: Client, challenge: str | None
) -> None:
    # Mode and token are right: the answer says what is wrong, the challenge.
    params = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN}
    if challenge is not None:
        params["hub.challenge"] = challenge
    resp = await client.get(URL, params=params)
    answer = await resp.json()
    assert (resp.status, answer["param"]) == (400, "hub.challenge")
    assert "1 to 256 characters" in answer["error"]


async def test_handshake_without_a_configured_token_is_403(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    client = await make_client(webhook={"app_secret_env": "CTWA_APP_SECRET"})
    params = {"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "1"}
    assert (await client.get(URL, params=params)).status == 403


# -- signatures -----------------------------------------------------------------------------


async def test_metas_documented_ctwa_message_is_captured(client: Client) -> None:
    answer = await post_signed(client, fixture("webhook_ctwa_text_message.json"))

    assert answer["messages"] == 1
    assert answer["conversationsCreated"] == 1
    assert answer["clicksCaptured"] == 1
    (conversation,) = await store_of(client).recent_conversations("acme", wa_id=None, limit=5)
    assert conversation.wa_id == "16505551234"
    assert conversation.ctwa_clid == CLID
    assert conversation.ctwa_source_id == "120226305854810726"
    assert conversation.ctwa_source_url == "https://fb.me/3cr4Wqqkv"
    assert conversation.ctwa_headline == "Chat with us"
    assert conversation.ctwa_source_type == "ad"
    assert conversation.ctwa_clicked_at == 1750275992
    assert conversation.last_inbound_at == 1750275992
    assert conversation.ctwa_capture_source == "message"
    assert conversation.ctwa_captured_at is not None
    assert abs(conversation.ctwa_captured_at - time.time()) < 60


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Hub-Signature-256": "sha256=" + "0" * 64},
        {"X-Hub-Signature-256": "sha1=abc"},
        {"X-Hub-Signature-256": "sha256=zz\u00e9"},
    ],
    ids=["missing", "wrong", "other scheme", "garbage"],
)
async def test_bad_signatures_are_401_and_store_nothing(
    client: Client, headers: dict[str, str], logs: LogCapture
) -> None:
    body = fixture("webhook_ctwa_text_message.json")
    resp = await client.post(URL, data=body, headers=headers)
    answer = await resp.json()
    assert resp.status == 401
    assert answer["code"] == "invalid_signature"
    assert await db_rows(client, "SELECT COUNT(*) FROM conversations") == [(0,)]
    assert logs.events("webhook_signature_rejected")


async def test_a_signature_by_another_secret_is_401(client: Client) -> None:
    body = fixture("webhook_ctwa_text_message.json")
    resp = await client.post(URL, data=body, headers=signed(body, secret="someone-else"))
    assert resp.status == 401


async def test_signature_covers_the_exact_escaped_unicode_bytes(client: Client) -> None:
    payload = notification(messages_change([message("5511912345678", "wamid.U1")]))
    payload["entry"][0]["changes"][0]["value"]["contacts"][0]["profile"]["name"] = "José Ñandú 😀"
    escaped = encode(payload)
    assert b"\\u00e9" in escaped
    # Re-serialized (unescaped) JSON says the same but is other bytes: its signature differs.
    raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    resp = await client.post(URL, data=raw, headers=signed(escaped))
    assert resp.status == 401
    answer = await post_signed(client, escaped)
    assert answer["messages"] == 1


async def test_without_an_app_secret_every_post_is_refused(
    make_client: ClientFactory, logs: LogCapture
) -> None:
    client = await make_client(webhook={"verify_token_env": "CTWA_VERIFY_TOKEN"})
    body = fixture("webhook_ctwa_text_message.json")
    resp = await client.post(URL, data=body, headers=signed(body))
    assert resp.status == 503
    assert (await resp.json())["code"] == "webhook_not_configured"
    assert logs.events("webhook_disabled")


async def test_oversized_body_is_413(make_client: ClientFactory) -> None:
    client = await make_client(webhook={**_webhook_env(), "max_body_bytes": 4096})
    body = encode(
        notification(messages_change([message(f"1650555{i:04d}", f"wamid.{i}") for i in range(40)]))
    )
    resp = await client.post(URL, data=body, headers=signed(body))
    assert resp.status == 413
    assert (await resp.json())["details"] == {"maxBodyBytes": 4096}


def _webhook_env() -> dict[str, str]:
    return {"verify_token_env": "CTWA_VERIFY_TOKEN", "app_secret_env": "CTWA_APP_SECRET"}


# -- what is captured -------------------------------------------------------------------------


async def test_status_notifications_are_acknowledged_and_ignored(client: Client) -> None:
    answer = await post_signed(client, fixture("webhook_status_failed.json"))
    assert answer["statuses"] == 1
    assert answer["messages"] == 0
    assert await db_rows(client, "SELECT COUNT(*) FROM conversations") == [(0,)]


async def test_video_ad_referral(client: Client) -> None:
    ref = referral("clid-video", media="video")
    await post_signed(
        client, notification(messages_change([message("16505550101", "wamid.V", ref=ref)]))
    )
    (conversation,) = await store_of(client).recent_conversations(
        "acme", wa_id="16505550101", limit=5
    )
    assert conversation.ctwa_clid == "clid-video"


async def test_several_entries_and_changes_in_one_post(client: Client) -> None:
    payload = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": WABA_ID,
                "changes": [
                    messages_change([message("16505550001", "wamid.A1", ref=referral("clid-a"))]),
                    messages_change([message("16505550002", "wamid.A2")]),
                ],
            },
            {
                "id": "200000000000001",
                "changes": [
                    messages_change(
                        [message("16505550003", "wamid.B1", ref=referral("clid-b"))],
                        phone_number_id="300000000000001",
                    )
                ],
            },
        ],
    }
    answer = await post_signed(client, payload)
    assert answer["messages"] == 3
    assert answer["clicksCaptured"] == 2
    store = store_of(client)
    assert len(await store.recent_conversations("acme", wa_id=None, limit=10)) == 2
    (other,) = await store.recent_conversations("other", wa_id=None, limit=10)
    assert other.ctwa_clid == "clid-b"


async def test_referral_without_click_id_records_the_ad_only(client: Client) -> None:
    ref = referral(None, source_id="status-ad-1")
    answer = await post_signed(
        client, notification(messages_change([message("16505550004", "wamid.S1", ref=ref)]))
    )
    assert answer["referralsWithoutClick"] == 1
    assert answer["clicksCaptured"] == 0
    (conversation,) = await store_of(client).recent_conversations("acme", wa_id=None, limit=5)
    assert conversation.ctwa_clid is None
    assert conversation.ctwa_source_id == "status-ad-1"
    # A later click id still fills the empty conversation.
    await post_signed(
        client,
        notification(messages_change([message("16505550004", "wamid.S2", ref=referral("late"))])),
    )
    (conversation,) = await store_of(client).recent_conversations("acme", wa_id=None, limit=5)
    assert conversation.ctwa_clid == "late"
    assert conversation.ctwa_source_id == "120226305854810726"


async def test_a_second_referral_does_not_overwrite_the_first(client: Client) -> None:
    now = time.time()
    first = message(
        "16505550005", "wamid.R1", ts=now - 3600, ref=referral("first", source_id="ad-1")
    )
    second = message("16505550005", "wamid.R2", ts=now, ref=referral("second", source_id="ad-2"))
    await post_signed(client, notification(messages_change([first])))
    answer = await post_signed(client, notification(messages_change([second])))
    assert answer["referralsIgnored"] == 1
    (conversation,) = await store_of(client).recent_conversations("acme", wa_id=None, limit=5)
    assert conversation.ctwa_clid == "first"
    assert conversation.ctwa_source_id == "ad-1"
    assert conversation.last_inbound_at == int(now)


async def test_a_new_click_after_the_window_starts_a_new_conversation(client: Client) -> None:
    now = time.time()
    old = message("16505550006", "wamid.O1", ts=now - 9 * DAY, ref=referral("old-click"))
    new = message("16505550006", "wamid.O2", ts=now, ref=referral("new-click"))
    await post_signed(client, notification(messages_change([old])))
    answer = await post_signed(client, notification(messages_change([new])))
    assert answer["conversationsCreated"] == 1
    assert answer["clicksCaptured"] == 1
    newest, oldest = await store_of(client).recent_conversations(
        "acme", wa_id="16505550006", limit=5
    )
    assert (newest.ctwa_clid, oldest.ctwa_clid) == ("new-click", "old-click")


async def test_the_same_message_twice_changes_nothing(client: Client) -> None:
    body = fixture("webhook_ctwa_text_message.json")
    await post_signed(client, body)
    before = await db_rows(client, "SELECT * FROM conversations")
    answer = await post_signed(client, body)
    assert answer["duplicates"] == 1
    assert answer["messages"] == 0
    assert await db_rows(client, "SELECT * FROM conversations") == before


async def test_duplicates_inside_one_batch_count_once(client: Client) -> None:
    msg = message("16505550007", "wamid.D1", ref=referral("dup"))
    answer = await post_signed(client, notification(messages_change([msg, msg])))
    assert (answer["messages"], answer["duplicates"]) == (1, 1)


async def test_unknown_numbers_are_acknowledged_counted_and_logged(
    client: Client, logs: LogCapture
) -> None:
    payload = notification(
        messages_change([message("16505550008", "wamid.X1")], phone_number_id="999999999999"),
        waba_id="888888888888",
    )
    answer = await post_signed(client, payload)
    assert answer["unknownNumbers"] == 1
    assert await db_rows(client, "SELECT COUNT(*) FROM conversations") == [(0,)]
    (line,) = logs.events("webhook_unknown_numbers")
    assert line["ids"] == ["999999999999"]


async def test_the_waba_id_maps_when_metadata_is_missing(client: Client) -> None:
    change = messages_change([message("16505550009", "wamid.W1", ref=referral("by-waba"))])
    del change["value"]["metadata"]
    answer = await post_signed(client, notification(change))
    assert answer["clicksCaptured"] == 1


async def test_automatic_event_recovers_a_missing_click(client: Client) -> None:
    await post_signed(client, notification(messages_change([message("16505550010", "wamid.AE1")])))
    event = {
        "id": "wamid.AE1",
        "event_name": "Purchase",
        "timestamp": int(time.time()),
        "ctwa_clid": "recovered-click",
        "custom_data": {"currency": "USD", "value": 25000},
    }
    answer = await post_signed(client, notification(automatic_change([event])))
    assert (answer["automaticEvents"], answer["clicksRecovered"]) == (1, 1)
    (conversation,) = await store_of(client).recent_conversations("acme", wa_id=None, limit=5)
    assert conversation.ctwa_clid == "recovered-click"
    assert conversation.ctwa_capture_source == "automatic_event"
    # Kept for the history, once.
    again = await post_signed(client, notification(automatic_change([event])))
    assert again["automaticEvents"] == 0
    assert await db_rows(
        client, "SELECT event_name, conversation_id IS NOT NULL FROM automatic_events"
    ) == [("Purchase", 1)]


async def test_automatic_event_never_overwrites_a_captured_click(client: Client) -> None:
    await post_signed(client, fixture("webhook_ctwa_text_message.json"))
    event = {
        "id": FIXTURE_WAMID,
        "event_name": "LeadSubmitted",
        "timestamp": 1750276000,
        "ctwa_clid": "other",
    }
    answer = await post_signed(client, notification(automatic_change([event])))
    assert answer["clicksRecovered"] == 0
    (conversation,) = await store_of(client).recent_conversations("acme", wa_id=None, limit=5)
    assert conversation.ctwa_clid == CLID


@pytest.mark.parametrize(
    ("mutate", "where", "code"),
    [
        (
            lambda p: p["entry"][1]["changes"][0]["value"]["messages"][0].update(timestamp="soon"),
            "$.entry[1].changes[0].value.messages[0]",
            "invalid_timestamp",
        ),
        (
            lambda p: p["entry"][1]["changes"][0]["value"]["messages"][0].update(
                {"from": "+1 650"}
            ),
            "$.entry[1].changes[0].value.messages[0]",
            "invalid_phone",
        ),
        (
            lambda p: p["entry"][1]["changes"][0]["value"].update(messages={"not": "a list"}),
            "$.entry[1].changes[0].value",
            "invalid_shape",
        ),
        (
            lambda p: p["entry"][1]["changes"][0]["value"]["messages"][0].pop("id"),
            "$.entry[1].changes[0].value.messages[0]",
            "invalid_shape",
        ),
    ],
    ids=["timestamp", "from", "messages not a list", "no id"],
)
async def test_a_malformed_part_is_listed_and_the_rest_captured(
    client: Client, mutate: Any, where: str, code: str
) -> None:
    good = messages_change([message("16505550011", "wamid.M1", ref=referral("m"))])
    bad = messages_change([message("16505550012", "wamid.M2")])
    payload = notification(good)
    payload["entry"].append({"id": WABA_ID, "changes": [bad]})
    mutate(payload)
    answer = await post_signed(client, payload)
    assert (answer["messages"], answer["clicksCaptured"], answer["unprocessed"]) == (1, 1, 1)
    (problem,) = answer["problems"]
    assert (problem["path"], problem["code"]) == (where, code)
    assert where in problem["reason"]
    assert answer["archiveStatus"] == "partial"
    assert await db_rows(client, "SELECT wa_id, ctwa_clid FROM conversations") == [
        ("16505550011", "m")
    ]
    assert await db_rows(client, "SELECT path, code FROM webhook_problems") == [(where, code)]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "Not valid JSON"),
        (b"[1,2]", "Expected `object`, got `array` - at `$`"),
        (b"null", "Expected `object`, got `null` - at `$`"),
        (b'{"entry": []}', "Object missing required field `object` - at `$`"),
        (b'{"object": "page", "entry": []}', "`$.object` is 'page'"),
    ],
    ids=["not json", "array", "null", "no object", "other object"],
)
async def test_signed_bodies_that_are_not_notifications_are_kept_and_explained(
    client: Client, body: bytes, reason: str
) -> None:
    answer = await post_signed(client, body)
    (problem,) = answer["problems"]
    assert problem["path"] == "$"
    assert reason in problem["reason"]
    assert await db_rows(client, "SELECT body, status FROM webhook_notifications") == [
        (body, "partial")
    ]


async def test_a_thousand_messages_commit_in_one_transaction(client: Client) -> None:
    msgs = [
        message(f"1650{i:07d}", f"wamid.K{i}", ref=referral(f"clid-{i}") if i % 2 else None)
        for i in range(1000)
    ]
    store = store_of(client)
    batches_before = store.writer.batches
    started = time.perf_counter()
    answer = await post_signed(client, notification(messages_change(msgs)))
    elapsed = time.perf_counter() - started
    assert (answer["messages"], answer["conversationsCreated"], answer["clicksCaptured"]) == (
        1000,
        1000,
        500,
    )
    assert store.writer.batches == batches_before + 1
    assert await db_rows(client, "SELECT COUNT(*) FROM webhook_messages") == [(1000,)]
    # Generous bound: it is a correctness test, the figure lives in bench/webhook.py.
    assert elapsed < 10


async def test_messages_apply_in_time_order_within_a_batch(client: Client) -> None:
    now = time.time()
    later = message("16505550013", "wamid.T2", ts=now, ref=referral("later"))
    earlier = message("16505550013", "wamid.T1", ts=now - 60, ref=referral("earlier"))
    await post_signed(client, notification(messages_change([later, earlier])))
    (conversation,) = await store_of(client).recent_conversations("acme", wa_id=None, limit=5)
    assert conversation.ctwa_clid == "earlier"
    assert conversation.last_inbound_at == int(now)


async def test_other_fields_are_acknowledged(client: Client) -> None:
    payload = notification({"field": "account_update", "value": {"event": "VERIFIED_ACCOUNT"}})
    answer = await post_signed(client, payload)
    assert answer["ignoredChanges"] == 1


async def test_nul_characters_lose_nothing_else_on_either_engine(client: Client) -> None:
    """PostgreSQL's text cannot hold a NUL (SQLite's can): an id with one is recorded as an
    unprocessed part, a display text loses it, and every other message is captured."""
    clean = message("16505550101", "wamid.clean", ref=referral("clid-clean"))
    bad_id = message("16505550102", "wamid.bad\u0000id", ref=referral("clid-bad"))
    bad_click = message("16505550103", "wamid.badclick", ref=referral("clid\u0000x"))
    headline = message("16505550104", "wamid.headline", ref=referral("clid-headline"))
    headline["referral"]["headline"] = "Summer\u0000 sale"
    answer = await post_signed(
        client, notification(messages_change([clean, bad_id, bad_click, headline]))
    )
    assert answer["clicksCaptured"] == 2
    assert sorted(p["path"] for p in answer["problems"]) == [
        "$.entry[0].changes[0].value.messages[1]",
        "$.entry[0].changes[0].value.messages[2]",
    ]
    rows = await db_rows(client, "SELECT wa_id, ctwa_headline FROM conversations ORDER BY wa_id")
    assert rows == [("16505550101", "Chat with us"), ("16505550104", "Summer sale")]
    # A NUL in a field a problem quotes (the number's id) is kept readable, not fatal.
    change = messages_change([message("16505550105", "wamid.other")], phone_number_id="10\u00006")
    answer = await post_signed(client, notification(change))
    assert [p["code"] for p in answer["problems"]] == ["unknown_number"]


async def test_secrets_ending_in_a_newline_are_read_without_it(
    make_client: ClientFactory,
) -> None:
    # A secret mounted from a file made with `echo` ends in a newline (the access token's
    # was fixed in 46a797d). The app secret's made every signature from Meta a mismatch: each
    # notification refused, and its clicks lost once Meta stopped retrying.
    from tests.conftest import APP_SECRET, ENV

    environ = {
        **ENV,
        "CTWA_APP_SECRET": APP_SECRET + "\n",
        "CTWA_VERIFY_TOKEN": VERIFY_TOKEN + "\n",
    }
    client = await make_client(environ=environ)
    answer = await post_signed(client, fixture("webhook_ctwa_text_message.json"))
    assert answer["clicksCaptured"] == 1
    params = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "42"}
    resp = await client.get(URL, params=params)
    assert (resp.status, await resp.text()) == (200, "42")
