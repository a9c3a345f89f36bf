"""Archive first: every signed notification is stored, odd parts are listed, nothing is lost."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import runtime
from gateway.capture.inbox import reprocess
from gateway.config import parse_settings
from gateway.errors import ConfigError
from gateway.http.keys import SETTINGS
from gateway.store.archive import NewNotification
from gateway.store.database import SqliteStore
from gateway.store.schema import MIGRATIONS
from tests.conftest import (
    AUTH,
    ENV,
    ClientFactory,
    LogCapture,
    base_config,
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
)
from tests.store_sql import add_fault, db_execute, drop_fault, store_rows

# Run on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_ENGINES = True

Client = TestClient[web.Request, web.Application]
URL = "/webhooks/whatsapp"
UNKNOWN_NUMBER = "777000000000001"


async def cli(*args: str) -> tuple[int, str]:
    """Run ``python -m gateway`` as an operator would; return its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        env={**os.environ, **ENV}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_a_signed_notification_is_archived_as_received(client: Client) -> None:
    body = encode(notification(messages_change([message("16505550400", "wamid.A")])))
    answer = await post_signed(client, body, **{"X-Request-Id": "meta-delivery-0001"})
    assert answer["archiveStatus"] == "processed"
    assert await db_rows(
        client, "SELECT pk, body, request_id, status FROM webhook_notifications"
    ) == [(answer["notificationId"], body, "meta-delivery-0001", "processed")]


async def test_the_archive_is_off_only_on_purpose_and_says_so(
    make_client: ClientFactory, logs: LogCapture
) -> None:
    client = await make_client(
        webhook={
            "verify_token_env": "CTWA_VERIFY_TOKEN",
            "app_secret_env": "CTWA_APP_SECRET",
            "archive": False,
        }
    )
    assert logs.events("webhook_archive_disabled")
    answer = await post_signed(
        client, encode(notification(messages_change([message("1650555", "w")])))
    )
    assert (answer["messages"], answer["notificationId"]) == (1, None)
    assert await db_rows(client, "SELECT COUNT(*) FROM webhook_notifications") == [(0,)]


async def test_invalid_utf8_inside_a_value(client: Client) -> None:
    good = message("16505550401", "wamid.U1", ref=referral("kept"), text="PLACEHOLDER_TEXT")
    bad = message(None, "wamid.U2", bsuid="PLACEHOLDER_ID", ref=referral("lost"))
    body = encode(notification(messages_change([good, bad])))
    # Invalid UTF-8 in a field we ignore is harmless; in one we read, its message is listed.
    body = body.replace(b"PLACEHOLDER_TEXT", b"\xff\xfe").replace(b"PLACEHOLDER_ID", b"US.\xc3")
    answer = await post_signed(client, body)
    assert (answer["messages"], answer["clicksCaptured"]) == (1, 1)
    (problem,) = answer["problems"]
    assert problem["path"] == "$.entry[0].changes[0].value.messages[1]"
    assert problem["code"] == "invalid_json"
    assert await db_rows(client, "SELECT body FROM webhook_notifications") == [(body,)]


@pytest.mark.parametrize("where", ["value", "unknown field", "top level"])
async def test_100000_nested_brackets_are_listed_not_a_500(client: Client, where: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    good = messages_change([message("16505550402", "wamid.D1", ref=referral("deep-ok"))])
    payload = notification(good, messages_change([message("16505550403", "wamid.D2")]))
    if where == "value":
        payload["entry"][0]["changes"][1]["value"]["contacts"] = "DEEP"
    elif where == "unknown field":
        payload["entry"][0]["changes"][1]["value"]["messages"][0]["extra"] = "DEEP"
    else:
        payload["extra"] = "DEEP"
    body = encode(payload).replace(b'"DEEP"', deep.encode())
    answer = await post_signed(client, body)
    (problem,) = answer["problems"]
    assert (problem["path"], problem["code"]) == ("$", "too_deep")
    # Only the too-deep part is dropped: both messages are captured.
    assert (answer["messages"], answer["clicksCaptured"]) == (2, 1)
    assert await db_rows(client, "SELECT body FROM webhook_notifications") == [(body,)]


async def test_millisecond_timestamps_are_read_as_milliseconds(client: Client) -> None:
    ms = message("16505550404", "wamid.MS", ref=referral("ms"))
    ms["timestamp"] = "1750275992000"
    answer = await post_signed(client, encode(notification(messages_change([ms]))))
    assert answer["messages"] == 1
    (conversation,) = await store_of(client).recent_conversations("acme", limit=5)
    assert conversation.last_inbound_at == 1750275992.0
    assert conversation.ctwa_clicked_at == 1750275992.0


@pytest.mark.parametrize("timestamp", ["99999999999999999", "-5", "1e400", "0", "4102444800"])
async def test_implausible_timestamps_are_listed(client: Client, timestamp: str) -> None:
    odd = message("16505550405", "wamid.TS", ref=referral("ts"))
    odd["timestamp"] = timestamp
    answer = await post_signed(client, encode(notification(messages_change([odd]))))
    assert (answer["messages"], answer["problems"][0]["code"]) == (0, "invalid_timestamp")


async def test_reads_survive_a_time_stored_by_an_older_version(client: Client) -> None:
    await post_signed(
        client, encode(notification(messages_change([message("16505550406", "w.Y")])))
    )
    await db_execute(
        client,
        "UPDATE conversations SET last_inbound_at = 1785000000000000, ctwa_clicked_at = 1e300",
    )
    resp = await client.get(
        "/v1/whatsapp/conversations", params={"accountId": "acme"}, headers=AUTH
    )
    assert resp.status == 200
    (conversation,) = (await resp.json())["conversations"]
    assert conversation["lastInboundAt"] is None
    one = await client.get(f"/v1/whatsapp/conversations/{conversation['id']}", headers=AUTH)
    assert one.status == 200


async def test_a_huge_click_id_is_refused_not_stored_nor_echoed(client: Client) -> None:
    huge = message("16505550407", "wamid.H", ref=referral("A" * 500_000))
    resp = await client.post(URL, data=(body := encode(notification(messages_change([huge])))),
                             headers=signed(body))  # fmt: skip
    raw = await resp.read()
    assert resp.status == 200
    assert len(raw) < 5000
    assert b"length <= 512" in raw
    assert await db_rows(client, "SELECT COUNT(*) FROM conversations") == [(0,)]


async def test_messages_past_the_limit_are_listed(client: Client) -> None:
    msgs = [message(f"1650{i:07d}", f"wamid.L{i}") for i in range(2001)]
    answer = await post_signed(client, encode(notification(messages_change(msgs))))
    assert (answer["messages"], answer["unprocessed"]) == (2000, 1)
    assert answer["problems"][0]["code"] == "too_many_messages"


async def test_metrics_count_unprocessed_parts_and_open_notifications(client: Client) -> None:
    await post_signed(client, encode(notification(messages_change([message(None, "wamid.NOID")]))))
    text = await (await client.get("/metrics")).text()
    assert 'ctwa_webhook_unprocessed_total{code="no_identity"} 1.0' in text
    assert 'ctwa_webhook_archive_open{status="partial"} 1.0' in text


async def test_an_unknown_number_is_captured_once_the_account_exists(
    client: Client, config: dict[str, Any], tmp_path: Path
) -> None:
    known = messages_change([message("16505550408", "wamid.K", ref=referral("known"))])
    unknown = messages_change(
        [message(None, "wamid.Q", bsuid="US.42", ref=referral("late-click"))],
        phone_number_id=UNKNOWN_NUMBER,
    )
    answer = await post_signed(client, encode(notification(known, unknown)))
    assert (answer["clicksCaptured"], answer["unknownNumbers"]) == (1, 1)
    await client.close()

    raw = {**config, "accounts": [*config["accounts"]]}
    config_file = tmp_path / "gateway.toml"
    config_file.write_bytes(tomli_w.dumps(raw).encode())
    code, out = await cli("webhooks", "list", "--config", str(config_file))
    assert code == 0
    assert "$.entry[0].changes[1]  [unknown_number]" in out
    assert UNKNOWN_NUMBER in out
    assert "US.42" not in out

    raw["accounts"].append(
        {"id": "late", "waba_id": "102290129340398", "phone_number_id": UNKNOWN_NUMBER}
    )
    config_file.write_bytes(tomli_w.dumps(raw).encode())
    code, out = await cli(
        "webhooks", "reprocess", "--config", str(config_file), "--account", "late"
    )
    assert code == 0, out
    assert "1 now fully processed" in out
    assert "1 messages and 1 click ids captured" in out
    assert await store_rows(
        raw, "SELECT account_id, bsuid, ctwa_clid FROM conversations ORDER BY 1"
    ) == [("acme", None, "known"), ("late", "US.42", "late-click")]
    assert await store_rows(raw, "SELECT status, problems FROM webhook_notifications") == [
        ("processed", 0)
    ]
    code, out = await cli("webhooks", "reprocess", "--config", str(config_file))
    assert "reprocessed 0 notifications" in out
    code, out = await cli("webhooks", "list", "--config", str(config_file))
    assert "no archived notification has unprocessed parts" in out


async def test_reprocessing_twice_captures_nothing_twice(
    client: Client, config: dict[str, Any]
) -> None:
    unknown = messages_change([message("16505550409", "wamid.T1", ref=referral("first"))],
                              phone_number_id=UNKNOWN_NUMBER)  # fmt: skip
    answer = await post_signed(client, encode(notification(unknown)))
    pk = answer["notificationId"]
    settings = parse_settings(
        {
            **config,
            "accounts": [
                *config["accounts"],
                {"id": "late", "waba_id": "1", "phone_number_id": UNKNOWN_NUMBER},
            ],
        }
    )
    store = store_of(client)
    # Meanwhile the same message arrived again through a live notification (a Meta retry
    # after the account was added): the reprocess must not capture it again.
    first = await reprocess(store, settings)
    assert (first.processed, first.messages) == (1, 1)
    await db_execute(client, "UPDATE webhook_notifications SET status = 'partial' WHERE pk = ?", pk)
    await db_execute(
        client,
        "INSERT INTO webhook_problems VALUES (?, '$.entry[0].changes[0]', 'unknown_number',"
        " 'again', NULL, ?)",
        pk,
        UNKNOWN_NUMBER,
    )
    second = await reprocess(store, settings)
    assert (second.processed, second.messages) == (1, 0)
    assert await db_rows(client, "SELECT COUNT(*), MAX(ctwa_clid) FROM conversations") == [
        (1, "first")
    ]


async def test_a_processing_fault_is_archived_pending_and_processed_at_the_next_start(
    make_client: ClientFactory, logs: LogCapture
) -> None:
    client = await make_client()
    # A real fault of the store in the middle of the capture transaction.
    await add_fault(
        client, "boom", "webhook_messages", "injected fault", when="NEW.wamid = 'wamid.boom'"
    )
    msgs = [
        message("16505550410", "wamid.ok", ref=referral("c1")),
        message("1650555041", "wamid.boom"),
    ]
    answer = await post_signed(client, encode(notification(messages_change(msgs))))
    assert (answer["archiveStatus"], answer["messages"]) == ("pending", 0)
    assert answer["problems"][0]["code"] == "processing_error"
    assert logs.events("webhook_processing_failed")
    assert await db_rows(client, "SELECT COUNT(*) FROM conversations") == [(0,)]
    await drop_fault(client, "boom", "webhook_messages")
    await client.close()

    restarted = await make_client()
    store = store_of(restarted)
    for _ in range(200):
        if await db_rows(restarted, "SELECT status FROM webhook_notifications") == [("processed",)]:
            break
        await asyncio.sleep(0.02)
    assert await db_rows(restarted, "SELECT status FROM webhook_notifications") == [("processed",)]
    assert len(await store.recent_conversations("acme", limit=10)) == 2
    assert await db_rows(restarted, "SELECT COUNT(*) FROM webhook_messages") == [(2,)]


async def test_a_pending_notification_is_processed_again_without_a_restart(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by review: only a start ran pending notifications again, so a replica that kept
    # running left the click uncaptured (conversions 422) until someone ran reprocess.
    monkeypatch.setattr(runtime, "_FIRST_PASS_S", 0.1)
    monkeypatch.setattr(runtime, "_PENDING_AGE_S", 0.0)
    client = await make_client()
    await add_fault(
        client, "boom", "webhook_messages", "injected fault", when="NEW.wamid = 'wamid.boom'"
    )
    msgs = [message("16505550412", "wamid.boom", ref=referral("c-pending"))]
    answer = await post_signed(client, encode(notification(messages_change(msgs))))
    assert answer["archiveStatus"] == "pending"
    await drop_fault(client, "boom", "webhook_messages")
    for _ in range(200):
        if await db_rows(client, "SELECT status FROM webhook_notifications") == [("processed",)]:
            break
        await asyncio.sleep(0.02)
    assert await db_rows(client, "SELECT ctwa_clid FROM conversations") == [("c-pending",)]


async def test_when_nothing_can_be_stored_meta_hears_503(client: Client) -> None:
    await add_fault(client, "disk_full", "webhook_notifications", "disk full")
    body = encode(notification(messages_change([message("16505550411", "wamid.F")])))
    resp = await client.post(URL, data=body, headers=signed(body))
    assert resp.status == 503
    assert (await resp.json())["code"] == "store_unavailable"
    assert await db_rows(client, "SELECT COUNT(*) FROM conversations") == [(0,)]


async def test_archived_notifications_are_pruned_with_their_problems(client: Client) -> None:
    for i in range(3):
        body = notification(messages_change([message(None, f"wamid.P{i}")]))
        await post_signed(client, encode(body))
    store = store_of(client)
    assert await store.prune_archive(time.time() - 60) == 0
    # One notification per transaction here: a prune never holds the writer long.
    transactions = store.writer.ops
    assert await store.prune_archive(time.time() + 60, batch_rows=1) == 3
    assert store.writer.ops - transactions == 4
    assert await db_rows(client, "SELECT COUNT(*) FROM webhook_problems") == [(0,)]


def test_the_archive_cannot_outlive_the_message_ids(db_path: Path) -> None:
    raw = base_config(db_path)
    raw["webhook"] = {**raw["webhook"], "archive_retention_days": 60}
    with pytest.raises(ConfigError, match=r"archive_retention_days \(60\) must not exceed"):
        parse_settings(raw)


async def test_store_migrates_conversations_of_the_previous_schema(tmp_path: Path) -> None:
    db = tmp_path / "v3.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
        for version, script in enumerate(MIGRATIONS[:3], start=1):
            conn.executescript(script)
            conn.execute("INSERT INTO schema_migrations VALUES (?)", (version,))
        # Two conversations for one phone (a new click after the window), as v3 kept them.
        conn.execute("INSERT INTO conversations (id, account_id, wa_id, created_at, ctwa_clid)"
                     " VALUES ('conv_old', 'acme', '16505550412', 1, 'a'),"
                     " ('conv_new', 'acme', '16505550412', 2, 'b')")  # fmt: skip
    store = await SqliteStore.open(db)
    try:
        (newest, oldest) = await store.recent_conversations("acme", limit=5)
    finally:
        await store.close()
    assert (newest.id, newest.superseded_by) == ("conv_new", None)
    assert (oldest.id, oldest.superseded_by) == ("conv_old", "conv_new")


@pytest.mark.parametrize("where", ["message", "automatic event"])
async def test_a_400_digit_timestamp_is_listed_and_its_siblings_captured(
    client: Client, where: str
) -> None:
    good = message("16505550420", "wamid.G4", ref=referral("sibling"))
    odd: dict[str, Any] = message("16505550421", "wamid.O4")
    odd["timestamp"] = "HUGE"
    changes = [messages_change([good, odd])]
    if where == "automatic event":
        changes = [
            messages_change([good]),
            automatic_change([{"id": "wamid.G4", "event_name": "Purchase", "timestamp": "HUGE"}]),
        ]
    body = encode(notification(*changes)).replace(b'"HUGE"', b"1" + b"0" * 400)
    answer = await post_signed(client, body)
    assert (answer["archiveStatus"], answer["clicksCaptured"]) == ("partial", 1)
    assert [p["code"] for p in answer["problems"]] == ["invalid_timestamp"]


async def test_contacts_are_auxiliary_whatever_their_shape(client: Client) -> None:
    change = messages_change([message(None, "wamid.C5", bsuid="US.C5", ref=referral("c5"))])
    change["value"]["contacts"] = {}
    other = messages_change([message(None, "wamid.C6", bsuid="US.C6", ref=referral("c6"))])
    other["value"]["contacts"] = [{"user_id": "US.C6", "wa_id": "+1 650 555 0101"}]
    answer = await post_signed(client, encode(notification(change, other)))
    assert (answer["clicksCaptured"], answer["unprocessed"]) == (2, 0)


async def test_two_problems_at_one_path_are_both_kept(client: Client) -> None:
    body = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # too deep, and no `object`
    answer = await post_signed(client, body)
    assert sorted(p["code"] for p in answer["problems"]) == ["invalid_shape", "too_deep"]
    assert await db_rows(client, "SELECT problems FROM webhook_notifications") == [(2,)]
    assert await db_rows(client, "SELECT COUNT(*) FROM webhook_problems") == [(2,)]


async def test_reprocess_for_one_account_leaves_pending_notifications_alone(
    client: Client, config: dict[str, Any], tmp_path: Path
) -> None:
    store = store_of(client)
    await store.archive_pending(
        NewNotification(body=encode(notification(messages_change([message("1650555", "w.PA")]))),
                        received_at=time.time(), request_id=None),
        error="test",
    )  # fmt: skip
    await client.close()
    config_file = tmp_path / "gateway.toml"
    config_file.write_bytes(tomli_w.dumps(config).encode())
    code, out = await cli(
        "webhooks", "reprocess", "--config", str(config_file), "--account", "acme"
    )
    assert "reprocessed 0 notifications" in out
    assert await store_rows(config, "SELECT status FROM webhook_notifications") == [("pending",)]
    for limit in ("0", "9" * 20):
        code, out = await cli("webhooks", "list", "--config", str(config_file), "--limit", limit)
        assert code == 2
        assert "not a whole number from 1 to 1000000" in out
        assert "Traceback" not in out


async def test_prune_runs_a_housekeeping_pass_on_demand(
    client: Client, config: dict[str, Any], tmp_path: Path
) -> None:
    change = messages_change([message("16505550402", "wamid.P1")])
    await post_signed(client, encode(notification(change)))
    await db_execute(client, "UPDATE webhook_messages SET received_at = received_at - 40 * 86400")
    await client.close()
    config_file = tmp_path / "gateway.toml"
    config_file.write_bytes(tomli_w.dumps(config).encode())
    code, out = await cli("prune", "--config", str(config_file))
    assert code == 0, out
    assert "webhook_message_ids 1" in out
    assert await store_rows(config, "SELECT COUNT(*) FROM webhook_messages") == [(0,)]


async def test_the_first_housekeeping_pass_comes_soon_after_start(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, logs: LogCapture
) -> None:
    # Found by review: the first pass came one interval (an hour) after start, so a gateway
    # restarted more often than that (deploys, a crash loop) never pruned anything.
    monkeypatch.setattr(runtime, "_FIRST_PASS_S", 0.1)
    client = await make_client()
    assert client.app[SETTINGS].store.housekeeping_interval_s == 3600
    change = messages_change([message("16505550401", "wamid.Old")])
    await post_signed(client, encode(notification(change)))
    await db_execute(client, "UPDATE webhook_messages SET received_at = received_at - 40 * 86400")
    for _ in range(100):
        if logs.events("webhook_data_pruned"):
            break
        await asyncio.sleep(0.02)
    assert await db_rows(client, "SELECT COUNT(*) FROM webhook_messages") == [(0,)]


async def test_housekeeping_prunes_what_outlived_its_retention(
    make_client: ClientFactory, config: dict[str, Any], logs: LogCapture
) -> None:
    config["store"] = {**config["store"], "housekeeping_interval_s": 0.1}
    client = await make_client(settings=parse_settings(config))
    for wamid in ("wamid.O", "wamid.N"):
        change = messages_change([message("16505550400", wamid)])
        await post_signed(client, encode(notification(change)))
    # One of them, and its message id, as if received 40 days ago (retention: 30).
    await db_execute(
        client,
        "UPDATE webhook_notifications SET received_at = received_at - 40 * 86400"
        " WHERE pk = (SELECT MIN(pk) FROM webhook_notifications)",
    )
    await db_execute(
        client,
        "UPDATE webhook_messages SET received_at = received_at - 40 * 86400"
        " WHERE wamid = 'wamid.O'",
    )
    pruned = [0, 0]
    for _ in range(50):
        # A run may straddle the update: count over every run.
        lines = logs.events("webhook_data_pruned")
        pruned = [sum(line[k] for line in lines) for k in ("message_ids", "notifications")]
        if pruned == [1, 1]:
            break
        await asyncio.sleep(0.05)
    assert pruned == [1, 1]
    assert await db_rows(client, "SELECT wamid FROM webhook_messages") == [("wamid.N",)]
    assert await db_rows(client, "SELECT COUNT(*) FROM webhook_notifications") == [(1,)]
