"""Erasure and suppression against what a review tried: every trace a person leaves, other
accounts, recycled numbers, deliveries in flight, replay, retention, restore, re-deliveries."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from gateway import DeliveryOptions, SendOutcome, hash_email, hash_external_id, hookimpl
from gateway.cli import main
from gateway.config import parse_settings
from gateway.http.app import reload_secrets
from gateway.store.backup import restore
from gateway.store.database import SqliteStore
from gateway.store.erasure import redact_notification
from gateway.store.retention import RetentionCutoffs
from gateway.wire import ConversionRequest, request_fingerprint
from tests.conftest import (
    AUTH,
    ENV,
    PHONE_NUMBER_ID,
    SCOPED_KEY,
    WABA_ID,
    ClientFactory,
    LogCapture,
    add_conversation,
    db_rows,
    store_of,
)
from tests.payloads import (
    automatic_change,
    encode,
    message,
    messages_change,
    notification,
    post_signed,
    referral,
    signed,
    system_message,
)
from tests.store_sql import db_execute, stored_bytes
from tests.test_lifecycle import Recorder

# Run on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_ENGINES = True

Client = TestClient[web.Request, web.Application]
URL = "/v1/whatsapp/conversions"

OLD = "5215512345678"  # Mexico, as WhatsApp ids it
NEW = "5215587654321"
BSUID = "MX.1112223334445556667"
PARENT = "MX.ENT.9998887776665554443"
USERNAME = "zelda.erasable"
NAME = "Zelda Erasable"
TEXT = "my private question 4242"
ECHO = "Hola Zelda, tu pedido va a Calle Secreta 12"
CLICK = "Aff-REVIEW15-click-0123456789abcdef"
EMAIL = "zelda@example.com"
# A real wamid is base64 of a protobuf holding the sender's phone (decode Meta's examples).
W1 = (
    "wamid."
    + base64.b64encode(
        b"\x1c\x18\x0d" + OLD.encode() + b"\x15\x02\x00\x12\x18\x143EB0C1A2B3C4D5E6F7A8\x00"
    ).decode()
)
EXTERNAL = "crm-zelda-77"


async def capture_everything(client: Client) -> None:
    now = int(time.time())
    # An automatic event that arrives before its message (no conversation yet).
    await post_signed(
        client,
        notification(
            automatic_change(
                [
                    {
                        "id": W1,
                        "event_name": "Purchase",
                        "timestamp": str(now),
                        "ctwa_clid": CLICK,
                        "custom_data": {"currency": "USD", "value": 5},
                    }
                ]
            )
        ),
    )
    first = message(
        OLD, W1, ts=now - 50, bsuid=BSUID, parent=PARENT, ref=referral(CLICK), text=TEXT
    )
    await post_signed(
        client,
        notification(messages_change([first], names={OLD: NAME}, usernames={BSUID: USERNAME})),
    )
    await post_signed(
        client,
        notification(
            messages_change(
                [message(OLD, "wamid.R2", ts=now - 40, bsuid=BSUID, text=TEXT + " again")],
                names={OLD: NAME},
            )
        ),
    )
    status = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
        "statuses": [
            {"id": "wamid.S1", "status": "read", "timestamp": str(now), "recipient_id": OLD},
            {
                "id": "wamid.S2",
                "status": "read",
                "timestamp": str(now),
                "recipient_user_id": BSUID,
                "recipient_parent_user_id": PARENT,
            },
        ],
    }
    await post_signed(client, notification({"value": status, "field": "messages"}))
    await post_signed(
        client,
        notification(
            automatic_change(
                [
                    {
                        "id": "wamid.R2",
                        "event_name": "LeadSubmitted",
                        "timestamp": str(now),
                        "ctwa_clid": CLICK,
                    }
                ]
            )
        ),
    )
    await post_signed(
        client,
        notification(
            messages_change(
                [
                    system_message(
                        "wamid.R3", "user_changed_number", wa_id=OLD, new_wa_id=NEW, ts=now - 30
                    )
                ]
            )
        ),
    )
    await post_signed(
        client,
        notification(
            messages_change([message(NEW, "wamid.R4", ts=now - 20, text=TEXT)], names={NEW: NAME})
        ),
    )
    # Coexistence: what the business sent the person (Meta's smb_message_echoes).
    echo = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
        "message_echoes": [
            {
                "from": "15550783881",
                "to": NEW,
                "id": "wamid.E1",
                "timestamp": str(now),
                "type": "text",
                "text": {"body": ECHO},
            }
        ],
    }
    await post_signed(client, notification({"value": echo, "field": "smb_message_echoes"}))


async def erase(client: Client, params: dict[str, str]) -> ClientResponse:
    """DELETE /v1/whatsapp/users with these query parameters, as the admin key."""
    return await client.delete("/v1/whatsapp/users", headers=AUTH, params=params)


async def purchase(client: Client, **fields: Any) -> ClientResponse:
    """POST a Purchase on acme with these request fields (camelCase names)."""
    body = {"accountId": "acme", "eventName": "Purchase", **fields}
    return await client.post(URL, headers=AUTH, json=body)


def traces() -> dict[str, bytes]:
    found = {
        "old phone": b"5512345678",
        "new phone": b"5587654321",
        "bsuid": BSUID.encode(),
        "parent": PARENT.encode(),
        "username": USERNAME.encode(),
        "name": NAME.encode(),
        "text": TEXT.encode(),
        "echo text": ECHO.encode(),
        "click": CLICK.encode(),
        "wamid (base64 of the phone)": W1.encode(),
        "hashed email": hash_email(EMAIL).encode(),
        "hashed external id": hash_external_id(EXTERNAL).encode(),
    }
    fp = request_fingerprint(
        ConversionRequest(
            account_id="acme",
            event_name="Purchase",
            event_id="R-PHONE",
            phone_e164="+52 55 1234 5678",
            email=EMAIL,
            external_id=EXTERNAL,
        )
    )
    for field, digest in fp.items():
        if field in ("phoneE164", "email", "externalId"):
            # Stored packed: the checksum's four bytes.
            found[f"request digest {field}"] = bytes.fromhex(digest)
    return found


async def test_erasure_leaves_no_trace_of_everything_a_person_left(
    make_client: ClientFactory,
) -> None:
    recorder = Recorder()
    client = await make_client(plugins={"sinks": ["log", "recorder"]}, extra={"recorder": recorder})
    await capture_everything(client)
    resp = await purchase(
        client,
        eventId="R-PHONE",
        phoneE164="+52 55 1234 5678",
        email=EMAIL,
        externalId=EXTERNAL,
        value=1,
        currency="USD",
    )
    assert resp.status in (200, 202), await resp.text()
    content = await stored_bytes(client)
    present = {k for k, v in traces().items() if v in content}
    assert present == set(traces())  # every trace is there before: the check can fail

    resp = await erase(client, {"accountId": "acme", "phoneE164": "+52 55 1234 5678"})
    assert resp.status == 200
    content = await stored_bytes(client)
    left = sorted(k for k, v in traces().items() if v in content)
    assert left == [], left


@pytest.mark.sqlite_only("a SQLite reader's snapshot holding the WAL checkpoint back")
async def test_a_reader_in_the_way_delays_clearing_the_file_and_says_so(
    make_client: ClientFactory, db_path: Path, logs: LogCapture
) -> None:
    """With a reader in the way (a backup in progress, a second process) the checkpoint
    cannot finish: the answer says so, and a retry clears the file once the reader is gone."""

    client = await make_client()
    await post_signed(
        client,
        notification(
            messages_change(
                [message(OLD, "wamid.C1", bsuid=BSUID, ref=referral(CLICK), text=TEXT)],
                names={OLD: NAME},
            )
        ),
    )
    await store_of(client).checkpoint()  # the person's rows are in the main file now
    reader = sqlite3.connect(db_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM conversations").fetchone()  # a snapshot, like backup
    resp = await client.delete(
        "/v1/whatsapp/users", headers=AUTH, params={"accountId": "acme", "phoneE164": "+" + OLD}
    )
    answer = await resp.json()
    assert resp.status == 200
    assert answer["fileCleared"] is False  # said, not silently claimed
    reader.execute("COMMIT")
    reader.close()
    await logs.wait_for("erasure_checkpoint_done", timeout_s=15)
    main = db_path.read_bytes()
    left = [
        k
        for k, v in {
            "bsuid": BSUID.encode(),
            "name": NAME.encode(),
            "click": CLICK.encode(),
            "text": TEXT.encode(),
        }.items()
        if v in main
    ]
    assert left == [], f"still in {db_path.name}: {left}"


@pytest.mark.sqlite_only("a SQLite reader's snapshot holding the WAL checkpoint back")
async def test_the_erasure_checkpoint_never_stalls_conversions(
    make_client: ClientFactory, db_path: Path
) -> None:
    """The checkpoint gives up quickly when a reader is in the way: conversions never wait
    for it."""

    client = await make_client()
    conversation = await add_conversation(store_of(client), wa_id=OLD)
    reader = sqlite3.connect(db_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM conversations").fetchone()
    erase = asyncio.create_task(
        client.delete(
            "/v1/whatsapp/users", headers=AUTH, params={"accountId": "acme", "phoneE164": "+" + NEW}
        )
    )
    await asyncio.sleep(0.5)
    started = time.monotonic()
    await purchase(
        client, eventId="BLOCKED", conversationId=conversation.id, value=1, currency="USD"
    )
    took = time.monotonic() - started
    await erase
    reader.execute("COMMIT")
    reader.close()
    assert took < 1.0


async def test_a_key_for_another_account_cannot_touch_this_accounts_archive(
    make_client: ClientFactory,
) -> None:
    """An erasure touches only its own account's archived notifications, and only values
    equal to the person's identifiers: a key for another account erasing acme's
    phone_number_id (or "1") changes nothing of acme's."""

    client = await make_client()
    await post_signed(
        client,
        notification(messages_change([message("16505550100", "wamid.A1", ref=referral(CLICK))])),
    )
    ((before,),) = await db_rows(client, "SELECT body FROM webhook_notifications")
    scoped = {"Authorization": f"Bearer {SCOPED_KEY}"}
    for param, value in (
        ("phoneE164", "106540352242922"),
        ("phoneE164", "+1 650 555 0100"),
        ("businessScopedUserId", "1"),
    ):
        await client.delete(
            "/v1/whatsapp/users", headers=scoped, params={"accountId": "other", param: value}
        )
    ((after,),) = await db_rows(client, "SELECT body FROM webhook_notifications")
    assert after == before


SECOND_NUMBER = "106540352299999"


async def test_an_account_sharing_the_waba_never_touches_the_others_archive(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    """Found by review (helper 19): one WABA, two numbers, each an account. A key for the
    second erasing the person (or the business's own numbers) rewrote the first's archived
    notifications, and its count told that key the person had written to the first."""
    config["accounts"][1]["waba_id"] = WABA_ID
    config["accounts"][1]["phone_number_id"] = SECOND_NUMBER
    client = await make_client(settings=parse_settings(config), environ=ENV)
    await post_signed(
        client,
        notification(messages_change([message("16505550100", "wamid.A1", ref=referral(CLICK))])),
    )
    ((before,),) = await db_rows(client, "SELECT body FROM webhook_notifications")
    scoped = {"Authorization": f"Bearer {SCOPED_KEY}"}
    for value in ("+16505550100", "+15550783881", "+106540352242922"):
        resp = await client.delete(
            "/v1/whatsapp/users", headers=scoped, params={"accountId": "other", "phoneE164": value}
        )
        assert (await resp.json())["erased"]["notificationsRedacted"] == 0
    ((after,),) = await db_rows(client, "SELECT body FROM webhook_notifications")
    assert after == before

    # The account's own erasure still redacts it, and leaves the business's metadata be.
    resp = await client.delete(
        "/v1/whatsapp/users",
        headers=AUTH,
        params={"accountId": "acme", "phoneE164": "+16505550100"},
    )
    assert (await resp.json())["erased"]["notificationsRedacted"] == 1
    ((after,),) = await db_rows(client, "SELECT body FROM webhook_notifications")
    assert b"16505550100" not in bytes(after)
    assert b'"display_phone_number":"15550783881"' in bytes(after)


@pytest.mark.parametrize(
    "part",
    [
        pytest.param(b"[" * 5000 + b"]" * 5000, id="nested-too-deeply"),
        pytest.param(b"1e400", id="number-out-of-range"),
    ],
)
async def test_a_body_that_does_not_decode_whole_is_still_redacted(
    client: Client, part: bytes
) -> None:
    """Found by review: capture reads such a body in parts and keeps the message; the erasure
    decoded it whole, and failed with a 500 (nested too deeply) or skipped it (a number
    msgspec refuses), leaving the person in the archive."""
    body = encode(notification(messages_change([message("16505550100", "wamid.D1")])))
    body = body.replace(b'"Can I get more info about this?"', part)
    resp = await client.post("/webhooks/whatsapp", data=body, headers=signed(body))
    assert (await resp.json())["conversationsCreated"] == 1

    resp = await client.delete(
        "/v1/whatsapp/users",
        headers=AUTH,
        params={"accountId": "acme", "phoneE164": "+16505550100"},
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["erased"]["notificationsRedacted"] == 1
    ((after,),) = await db_rows(client, "SELECT body FROM webhook_notifications")
    assert b"16505550100" not in bytes(after)


def test_a_body_that_cannot_be_read_at_all_becomes_a_tombstone_if_it_names_them() -> None:
    # Who such a body names cannot be told apart: if it holds the person's identifier and the
    # account's number, it must not keep them; another account's is left alone.
    body = b'{"entry":[{"changes":[{"value":{"metadata":{"phone_number_id":"106540352242922"},'
    body += b'"messages":[{"from":"16505550100","text":{"body":"\xff"}}]}}]}]}'
    person = frozenset({"16505550100"})
    tombstone = redact_notification(body, person, waba_id=WABA_ID, phone_number_id=PHONE_NUMBER_ID)
    assert tombstone is not None
    assert b"16505550100" not in tombstone
    assert redact_notification(body, person, waba_id=WABA_ID, phone_number_id="1") is None


def test_an_unwritable_body_that_named_them_becomes_a_tombstone() -> None:
    # Review of the lenient reading: a lone surrogate (a cut emoji) that only it takes could
    # not be written back, and the whole erasure failed (500).
    body = (
        b'{"entry":[{"changes":[{"value":{"metadata":{"phone_number_id":"106540352242922"},'
        b'"messages":[{"from":"16505550100"},{"from":"16505550199","text":{"body":"\\ud83d"}}]}}]}]}'
    )
    person = frozenset({"16505550100"})
    redacted = redact_notification(body, person, waba_id=WABA_ID, phone_number_id=PHONE_NUMBER_ID)
    assert redacted is not None
    assert b"16505550100" not in redacted


def test_a_change_with_an_empty_number_is_the_wabas_as_capture_reads_it() -> None:
    # Review of the ownership rule: capture reads an empty phone_number_id as none (and
    # goes by the WABA); the erasure must take the change as capture did.
    body = (
        b'{"entry":[{"id":"%s","changes":[{"value":{"metadata":{"phone_number_id":""},'
        b'"messages":[{"from":"16505550100"}]}}]}]}' % WABA_ID.encode()
    )
    person = frozenset({"16505550100"})
    redacted = redact_notification(body, person, waba_id=WABA_ID, phone_number_id=PHONE_NUMBER_ID)
    assert redacted is not None
    assert b"16505550100" not in redacted


KEY = "suppression-secret-0123456789"


async def suppressing_client(make_client: ClientFactory, config: dict[str, Any]) -> Client:
    config["privacy"] = {"suppression_key_env": "CTWA_SUPPRESSION_KEY"}
    return await make_client(
        settings=parse_settings(config), environ={**ENV, "CTWA_SUPPRESSION_KEY": KEY}
    )


async def test_suppressed_by_phone_stays_out_by_bsuid(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    """Every identifier the erasure found is suppressed, not only the one given: erased by
    phone, the person stays out by their BSUID too."""
    client = await suppressing_client(make_client, config)
    await post_signed(
        client,
        notification(
            messages_change(
                [message(OLD, "wamid.P1", bsuid=BSUID, parent=PARENT, ref=referral(CLICK))]
            )
        ),
    )
    resp = await erase(client, {"accountId": "acme", "phoneE164": "+" + OLD, "suppress": "true"})
    assert resp.status == 200
    # Meta withholds the phone (username adopters): a BSUID-only message, another ad.
    await post_signed(
        client,
        notification(
            messages_change(
                [message(None, "wamid.P2", bsuid=BSUID, parent=PARENT, ref=referral(CLICK + "2"))]
            )
        ),
    )
    resp = await purchase(
        client, eventId="SUPP", businessScopedUserId=BSUID, value=1, currency="USD"
    )
    assert await db_rows(client, "SELECT COUNT(*) FROM conversations") == [(0,)]


async def test_a_suppression_recorded_by_the_cli_reaches_a_running_gateway(
    make_client: ClientFactory, config: dict[str, Any], tmp_path: Path
) -> None:
    """A suppression recorded by `ctwa-gateway erase --suppress` (another process) reaches a
    running gateway within [privacy] suppressions_refresh_s."""

    config["privacy"] = {
        "suppression_key_env": "CTWA_SUPPRESSION_KEY",
        "suppressions_refresh_s": 0.1,
    }
    client = await make_client(
        settings=parse_settings(config), environ={**ENV, "CTWA_SUPPRESSION_KEY": KEY}
    )
    await post_signed(
        client, notification(messages_change([message(OLD, "wamid.Q1", ref=referral(CLICK))]))
    )
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(tomli_w.dumps(config))
    rc = await asyncio.to_thread(
        main,
        [
            "erase",
            "--config",
            str(config_file),
            "--account",
            "acme",
            "--phone",
            "+" + OLD,
            "--suppress",
        ],
        environ={**ENV, "CTWA_SUPPRESSION_KEY": KEY},
    )
    assert rc == 0
    for _ in range(50):  # the running gateway reads it within suppressions_refresh_s
        if store_of(client).suppressed:
            break
        await asyncio.sleep(0.05)
    await post_signed(
        client, notification(messages_change([message(OLD, "wamid.Q2", ref=referral(CLICK))]))
    )
    rows = await db_rows(client, "SELECT id FROM conversations")
    if rows:
        await purchase(
            client, eventId="CLI-SUPP", conversationId=rows[0][0], value=1, currency="USD"
        )
    assert rows == []


async def test_one_suppression_key_makes_and_checks_digests(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    """One key makes and checks digests, read at start: a SIGHUP does not split them."""

    client = await suppressing_client(make_client, config)
    assert reload_secrets(client.app, {**ENV, "CTWA_SUPPRESSION_KEY": KEY + "-rotated"})
    resp = await erase(client, {"accountId": "acme", "phoneE164": "+" + OLD, "suppress": "true"})
    assert resp.status == 200
    await post_signed(
        client, notification(messages_change([message(OLD, "wamid.K1", ref=referral(CLICK))]))
    )
    assert await db_rows(client, "SELECT COUNT(*) FROM conversations") == [(0,)]


class Gate:
    """An outbox sink whose first send waits for the test, then answers retry."""

    def __init__(self) -> None:

        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.sent: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def gateway_delivery_options(self) -> Any:

        return DeliveryOptions(retry_base_s=0.05, retry_cap_s=0.1, poll_s=0.05, respond_within_ms=0)

    @hookimpl
    async def gateway_send_events(self, events: list[Any]) -> list[Any]:

        self.sent += [(e.event_id, e.event) for e in events]
        if not self.release.is_set():
            self.entered.set()
            await self.release.wait()
            return [SendOutcome(status="retry", reason="down") for _ in events]
        return [SendOutcome(status="delivered") for _ in events]


async def test_an_erasure_during_an_attempt_stays_cancelled(make_client: ClientFactory) -> None:
    """A batch in flight when the person is erased cannot revive the cancelled delivery: it
    is never sent again."""

    gate = Gate()
    client = await make_client(plugins={"sinks": ["gate"]}, extra={"gate": gate})
    await post_signed(
        client, notification(messages_change([message(OLD, "wamid.G1", ref=referral(CLICK))]))
    )
    resp = await purchase(
        client, eventId="INFLIGHT", phoneE164="+" + OLD, email=EMAIL, value=1, currency="USD"
    )
    assert resp.status == 202
    await asyncio.wait_for(gate.entered.wait(), 5)
    resp = await client.delete(
        "/v1/whatsapp/users", headers=AUTH, params={"accountId": "acme", "phoneE164": "+" + OLD}
    )
    assert (await resp.json())["erased"]["deliveriesCancelled"] == 1
    gate.release.set()
    await asyncio.sleep(1.0)
    assert len(gate.sent) == 1, "sent again after the erasure"


async def test_replay_never_requeues_erased_deliveries(make_client: ClientFactory) -> None:
    """`ctwa-gateway replay` (default --status failed) leaves erased deliveries cancelled."""
    recorder = SlowRecorder()
    client = await make_client(plugins={"sinks": ["recorder"]}, extra={"recorder": recorder})
    await post_signed(
        client, notification(messages_change([message(OLD, "wamid.H1", ref=referral(CLICK))]))
    )
    resp = await purchase(client, eventId="REPLAYED", phoneE164="+" + OLD, value=1, currency="USD")
    assert resp.status == 202
    for _ in range(100):
        if await db_rows(client, "SELECT attempts FROM deliveries") == [(1,)]:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    await client.delete(
        "/v1/whatsapp/users", headers=AUTH, params={"accountId": "acme", "phoneE164": "+" + OLD}
    )
    await asyncio.sleep(0.3)
    await store_of(client).outbox.requeue("acme", sinks=["recorder"], statuses=["failed"], since=0)
    recorder.delivering = True
    await asyncio.sleep(0.5)
    assert recorder.sent == []


class SlowRecorder(Recorder):
    @hookimpl
    def gateway_delivery_options(self) -> Any:

        return DeliveryOptions(retry_base_s=60, retry_cap_s=60, poll_s=0.05, respond_within_ms=0)


class Failer:
    @hookimpl
    def gateway_delivery_options(self) -> Any:

        return DeliveryOptions(retry_base_s=60, retry_cap_s=60, poll_s=0.05, respond_within_ms=0)

    @hookimpl
    async def gateway_send_events(self, events: list[Any]) -> list[Any]:

        return [SendOutcome(status="failed", reason="bad") for _ in events]


async def test_failed_events_retention_keeps_a_pending_delivery(make_client: ClientFactory) -> None:
    """An event shows "failed" while another sink is still pending: retention of failed
    events keeps it, so the pending delivery is not lost."""

    client = await make_client(
        plugins={"sinks": ["failer", "recorder"]},
        extra={"failer": Failer(), "recorder": SlowRecorder()},
    )
    conversation = await add_conversation(store_of(client), wa_id=OLD)
    resp = await purchase(
        client, eventId="TWO-SINKS", conversationId=conversation.id, value=1, currency="USD"
    )
    assert resp.status in (200, 202), await resp.text()
    for _ in range(100):
        if ("failer", "failed") in await db_rows(client, "SELECT sink, status FROM deliveries"):
            break
        await asyncio.sleep(0.05)
    await db_execute(client, "UPDATE events SET received_at = received_at - 2 * 86400")
    now = time.time()
    await store_of(client).apply_retention(
        RetentionCutoffs(conversations=0, clicks=0, delivered_events=0, failed_events=now - 86400),
        500,
    )
    assert ("recorder", "pending") in await db_rows(client, "SELECT sink, status FROM deliveries")


async def test_delete_odd_inputs_never_5xx(client: Client) -> None:
    cases = [
        {"accountId": "acme", "phoneE164": "9" * 64},
        {"accountId": "acme", "phoneE164": "+٥٥١٢٣٤٥٦٧٨٩"},
        {"accountId": "acme", "phoneE164": "\x00"},
        {"accountId": "acme", "businessScopedUserId": "x" * 300},
        {"accountId": "acme", "businessScopedUserId": "US.1\n"},
        {"accountId": "acme", "conversationId": "c" * 129},
        {"accountId": "acme", "conversationId": "'; DROP TABLE x"},
        {"accountId": "acme", "conversationId": "x", "suppress": "true"},
        {"accountId": "acme", "phoneE164": "+16505550100", "suppress": ""},
        {"accountId": "acme", "phoneE164": "+16505550100", "suppress": "1"},
        {"accountId": "nope", "phoneE164": "+16505550100"},
        {"accountId": "a" * 5000, "phoneE164": "+16505550100"},
        {"accountId": "acme", "phoneE164": "+16505550100", "businessScopedUserId": ""},
        {"accountId": "acme", "phoneE164": "+1 650 555 0100 ext 2"},
    ]
    for params in cases:
        resp = await client.delete("/v1/whatsapp/users", params=params, headers=AUTH)
        await resp.text()
        assert resp.status < 500
    resp = await client.delete(
        "/v1/whatsapp/users?accountId=acme&phoneE164=%2B16505550100&phoneE164=%2B16505550101",
        headers=AUTH,
    )


async def test_events_of_pruned_conversations_lose_their_identifiers(
    make_client: ClientFactory,
) -> None:
    """When retention prunes a conversation, its finished events lose the person's hashed
    identifiers too: no erasure could find them afterwards."""

    client = await make_client()
    await post_signed(
        client, notification(messages_change([message(OLD, "wamid.T1", ref=referral(CLICK))]))
    )
    resp = await purchase(
        client,
        eventId="ORPHAN",
        phoneE164="+" + OLD,
        email=EMAIL,
        externalId=EXTERNAL,
        value=1,
        currency="USD",
    )
    assert resp.status == 200
    far = time.time() + 10
    # Retention as housekeeping runs it months later (events still within their keeping time).
    await store_of(client).apply_retention(
        RetentionCutoffs(conversations=far, clicks=far, delivered_events=0, failed_events=0), 500
    )
    resp = await client.delete(
        "/v1/whatsapp/users", headers=AUTH, params={"accountId": "acme", "phoneE164": "+" + OLD}
    )
    (event,) = await db_rows(client, "SELECT event, request_fields FROM events")
    assert hash_email(EMAIL).encode() not in event[0]


async def test_an_erased_person_s_reused_event_id_is_still_told_from_a_retry(
    make_client: ClientFactory,
) -> None:
    """Erasure drops the digests of the person's fields, not those of what was bought: a
    reused eventId with another value is still a 409 afterwards, and the retry of the very
    same body (the phone included) still gets the original answer. (Found by review: every
    digest was dropped, and any body with that eventId was answered as the original.)"""

    client = await make_client()
    await post_signed(
        client, notification(messages_change([message(OLD, "wamid.T1", ref=referral(CLICK))]))
    )
    body = {"eventId": "ERASED-1", "phoneE164": "+" + OLD, "email": EMAIL, "value": 5,
            "currency": "USD"}  # fmt: skip
    first = await purchase(client, **body)
    assert first.status == 200, await first.text()
    resp = await erase(client, {"accountId": "acme", "phoneE164": "+" + OLD})
    assert resp.status == 200

    reused = await purchase(client, **{**body, "value": 7})
    answer = await reused.json()
    assert (reused.status, answer["code"], answer["param"]) == (409, "event_id_reused", "value")
    other_name = await client.post(
        URL, headers=AUTH, json={"accountId": "acme", **body, "eventName": "Lead"}
    )
    assert (other_name.status, (await other_name.json())["param"]) == (409, "eventName")
    retry = await purchase(client, **body)
    assert retry.status == 200
    assert (await retry.json())["duplicate"] is True
    # Sent only now, a field the original did not carry is still a difference.
    more = await purchase(client, **body, externalId=EXTERNAL)
    assert (more.status, (await more.json())["param"]) == (409, "externalId")
    (fields,) = await db_rows(client, "SELECT request_fields FROM events")
    assert b'"phoneE164":"erased"' in fields[0]
    assert b'"email":"erased"' in fields[0]


def test_restore_refuses_what_is_not_a_store(db_path: Path, tmp_path: Path) -> None:
    """A database that is not a ctwa-gateway store (another application's, an empty one) is
    refused, and the store is left as it was."""

    async def seed() -> None:

        store = await SqliteStore.open(db_path)
        await add_conversation(store, wa_id=OLD)
        await store.close()

    asyncio.run(seed())
    foreign = tmp_path / "other-app.sqlite3"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
        conn.execute("INSERT INTO schema_migrations VALUES (6)")
    try:
        restore(foreign, db_path)
        restored = True
    except Exception:
        restored = False

    assert not restored


async def test_erasing_a_recycled_numbers_new_owner_spares_the_previous_owner(
    make_client: ClientFactory,
) -> None:
    """Erasing a recycled number's new owner never erases its previous owner, whose
    conversation was superseded by the new owner's."""
    client = await make_client()
    now = time.time()
    await post_signed(
        client,
        notification(
            messages_change(
                [
                    message(
                        OLD,
                        "wamid.V1",
                        ts=now - 100,
                        bsuid="MX.100000000000000000001",
                        ref=referral(CLICK),
                    )
                ]
            )
        ),
    )
    await post_signed(
        client,
        notification(
            messages_change(
                [
                    message(
                        OLD,
                        "wamid.V2",
                        ts=now - 10,
                        bsuid="MX.200000000000000000002",
                        ref=referral(CLICK + "B"),
                    )
                ]
            )
        ),
    )
    await erase(client, {"accountId": "acme", "businessScopedUserId": "MX.200000000000000000002"})
    left = await db_rows(client, "SELECT bsuid FROM conversations")
    assert left == [("MX.100000000000000000001",)], left


async def test_a_suppressed_persons_new_messages_stay_out_of_the_archive(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    """A suppressed person's new messages are kept out of the archive too, not only out of
    capture."""
    client = await suppressing_client(make_client, config)
    resp = await erase(client, {"accountId": "acme", "phoneE164": "+" + OLD, "suppress": "true"})
    assert resp.status == 200
    await post_signed(
        client,
        notification(
            messages_change(
                [message(OLD, "wamid.U1", bsuid=BSUID, ref=referral(CLICK), text=TEXT)],
                names={OLD: NAME},
            )
        ),
    )
    assert await db_rows(client, "SELECT COUNT(*) FROM conversations") == [(0,)]
    content = await stored_bytes(client)
    assert [t for t in (OLD, NAME, TEXT, CLICK) if t.encode() in content] == []


async def test_a_redelivered_notification_recaptures_only_the_unsuppressed(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    """The wamid dedup rows go with the person (a wamid carries their phone): Meta
    re-delivering a notification it had no answer for would capture them again, as a new
    contact. Suppression is what keeps them out for good (the README says so)."""
    client = await suppressing_client(make_client, config)
    body = encode(
        notification(
            messages_change(
                [message(OLD, "wamid.D1", ref=referral(CLICK), text=TEXT)], names={OLD: NAME}
            )
        )
    )
    await post_signed(client, body)
    await erase(client, {"accountId": "acme", "phoneE164": "+" + OLD, "suppress": "true"})
    await post_signed(client, body)  # the same bytes, as Meta retries
    assert await db_rows(client, "SELECT COUNT(*) FROM conversations") == [(0,)]


# A number that changes hands through a change of number (review of the recycled-number rule):
# A writes from N, changes to M (a new BSUID), and N goes to B, who writes from it.
N = "16505551234"
M = "16505559876"
A1, A2, B1 = "US.100000000000000000001", "US.100000000000000000002", "US.200000000000000000003"


async def a_changes_away_and_b_takes_the_number(client: Client) -> tuple[bytes, bytes]:
    """Capture A's click, A's change N -> M and B's click from N; return A's first archived
    notification and B's, as stored."""
    now = time.time()
    for change in (
        message(N, "wamid.A1", ts=now - 300, bsuid=A1, ref=referral(CLICK + "A")),
        system_message(
            "wamid.A2", "user_changed_number", wa_id=N, bsuid=A1, new_wa_id=M, new_bsuid=A2,
            previous_bsuid=A1, ts=now - 200,
        ),
        message(N, "wamid.B1", ts=now - 100, bsuid=B1, ref=referral(CLICK + "B")),
    ):  # fmt: skip
        await post_signed(client, notification(messages_change([change])))
    conversations = await db_rows(client, "SELECT wa_id, bsuid FROM conversations")
    assert sorted(conversations) == [(N, B1), (M, A2)]  # two people, as capture tells them
    bodies = await archived(client)
    return bodies[0], bodies[2]


async def archived(client: Client) -> list[bytes]:
    """The archived notifications' bodies, oldest first."""
    rows = await db_rows(client, "SELECT body FROM webhook_notifications ORDER BY pk")
    return [bytes(row[0]) for row in rows]


async def test_erasing_a_numbers_new_holder_spares_who_changed_away_from_it(
    client: Client,
) -> None:
    """Found by review: N stayed an alias of A's conversation (a former number), and erasing
    B by N erased A too, who is now on M."""
    _, b_archived = await a_changes_away_and_b_takes_the_number(client)
    resp = await erase(client, {"accountId": "acme", "phoneE164": "+" + N})
    assert resp.status == 200
    assert (await resp.json())["erased"]["conversations"] == 1
    assert await db_rows(client, "SELECT wa_id, bsuid FROM conversations") == [(M, A2)]
    archive = b"".join(await archived(client))
    assert b_archived not in archive
    assert B1.encode() not in archive
    assert CLICK.encode() + b"B" not in archive


async def test_erasing_who_changed_away_spares_their_former_numbers_new_holder(
    client: Client,
) -> None:
    """Found by review: erasing A by M followed A's former number N to B's conversation, and
    rewrote B's archived notifications."""
    _, b_archived = await a_changes_away_and_b_takes_the_number(client)
    resp = await erase(client, {"accountId": "acme", "phoneE164": "+" + M})
    assert resp.status == 200
    assert (await resp.json())["erased"]["conversations"] == 1
    assert await db_rows(client, "SELECT wa_id, bsuid FROM conversations") == [(N, B1)]
    bodies = await archived(client)
    assert bodies[2] == b_archived  # B's, untouched
    assert not any(v in body for body in bodies[:2] for v in (A1.encode(), A2.encode()))
    # A BSUID names A as well, and spares B the same way.
    resp = await erase(client, {"accountId": "acme", "businessScopedUserId": A1})
    assert (await resp.json())["erased"]["conversations"] == 0
    assert await db_rows(client, "SELECT wa_id, bsuid FROM conversations") == [(N, B1)]


async def test_suppressing_who_changed_away_never_suppresses_their_former_numbers_new_holder(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    """Found by review: suppressing A suppressed every phone and BSUID found, B's number and
    BSUID among them, and B's next messages were dropped. Only A's identifiers are now."""
    client = await suppressing_client(make_client, config)
    await a_changes_away_and_b_takes_the_number(client)
    resp = await erase(client, {"accountId": "acme", "phoneE164": "+" + M, "suppress": "true"})
    assert resp.status == 200
    # M, A2 and A's former BSUID A1; not N, which B holds, nor B1.
    assert await db_rows(client, "SELECT COUNT(*) FROM suppressions") == [(3,)]
    await post_signed(
        client,
        notification(messages_change([message(N, "wamid.B2", bsuid=B1, text=TEXT)])),
    )
    assert await db_rows(client, "SELECT wa_id, bsuid FROM conversations") == [(N, B1)]
    assert await db_rows(client, "SELECT COUNT(*) FROM webhook_messages") == [(2,)]


async def test_an_erasure_by_a_word_that_is_no_bsuid_is_refused_and_rewrites_nothing(
    client: Client,
) -> None:
    """Found by review: any word passed for a BSUID, and the archive's values equal to it,
    wherever they were, became "[erased]" ("type": "text" among them), corrupting what
    `webhooks reprocess` reads."""
    await post_signed(
        client,
        notification(messages_change([message(N, "wamid.X1", bsuid=A1, ref=referral(CLICK))])),
    )
    before = await db_rows(client, "SELECT body FROM webhook_notifications")
    for word in ("text", "ad", "image", "whatsapp", "US", "US.1.2", "us.1", "US.1\n"):
        resp = await erase(client, {"accountId": "acme", "businessScopedUserId": word})
        answer = await resp.json()
        assert (resp.status, answer["param"]) == (400, "businessScopedUserId"), word
    assert await db_rows(client, "SELECT body FROM webhook_notifications") == before
    assert await db_rows(client, "SELECT COUNT(*) FROM erasures") == [(0,)]


def test_only_values_under_identifying_keys_are_redacted() -> None:
    """An identifier is redacted where Meta puts a person's identifier, never elsewhere: a
    username "text" must not rewrite a message's "type": "text"."""
    body = encode(notification(messages_change([message(N, "wamid.K1", ref=referral(CLICK))])))
    body = body.replace(b'"profile":{', b'"profile":{"username":"text",')
    redacted = redact_notification(
        body, frozenset({"text"}), waba_id=WABA_ID, phone_number_id=PHONE_NUMBER_ID
    )
    assert redacted is not None
    assert b'"username"' not in redacted
    assert b'"profile":{"erased":true}' in redacted
    assert redacted.count(b'"text"') == body.count(b'"text"') - 1  # only the username
    assert b'"type":"text"' in redacted
