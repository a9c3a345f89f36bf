"""Data lifecycle: retention, erasure on request, suppression, backup and restore, store stats."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import tomli_w
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import DeliveryOptions, QueuedEvent, SendOutcome, hash_email, hookimpl
from gateway.cli import main
from gateway.config import parse_settings
from gateway.domain import SinkState, StoredEvent
from gateway.errors import ConfigError, UsageError
from gateway.store.backup import backup, restore
from gateway.store.database import SqliteStore
from gateway.store.engines import open_store
from gateway.store.locks import serving_lock
from gateway.wire import ConversionRequest, request_fingerprint
from tests.conftest import (
    AUTH,
    ENV,
    ClientFactory,
    LogCapture,
    add_conversation,
    db_rows,
    event_detail,
    settle,
    store_of,
)
from tests.payloads import message, messages_change, notification, post_signed, referral
from tests.store_sql import db_execute, stored_bytes
from tests.test_store import new_event

# Run on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_ENGINES = True

Client = TestClient[web.Request, web.Application]
URL = "/v1/whatsapp/conversions"
DAY = 86400


async def lead(client: Client, event_id: str, conversation_id: str) -> None:
    body = {
        "accountId": "acme",
        "eventName": "Purchase",
        "eventId": event_id,
        "conversationId": conversation_id,
        "value": 10,
        "currency": "USD",
    }
    resp = await client.post(URL, json=body, headers=AUTH)
    assert resp.status == 200, await resp.text()


async def test_housekeeping_applies_each_retention_rule(
    make_client: ClientFactory, config: dict[str, Any], logs: LogCapture
) -> None:
    config["store"] = {**config["store"], "housekeeping_interval_s": 0.2}
    config["retention"] = {"batch_rows": 10}
    client = await make_client(settings=parse_settings(config))
    store = store_of(client)
    clicked = await add_conversation(store, wa_id="16505550001")
    quiet = await add_conversation(store, wa_id="16505550002", clid=None)
    fresh = await add_conversation(store, wa_id="16505550003", clid=None)
    for i in range(25):  # more than one batch
        await lead(client, f"OLD{i}", clicked.id)
    await lead(client, "FAILED", clicked.id)
    await lead(client, "NEW", clicked.id)
    now = time.time()
    # Rows made to look older (received_at, created_at...).
    await db_execute(
        client, "UPDATE events SET received_at = ? WHERE event_id != 'NEW'", now - 100 * DAY
    )
    await db_execute(client, "UPDATE events SET status = 'failed' WHERE event_id = 'FAILED'")
    await db_execute(
        client,
        "UPDATE conversations SET ctwa_clicked_at = ? WHERE id = ?",
        now - 40 * DAY,
        clicked.id,
    )
    await db_execute(
        client,
        "UPDATE conversations SET created_at = ?, last_inbound_at = ? WHERE id = ?",
        now - 91 * DAY,
        now - 91 * DAY,
        quiet.id,
    )

    (line,) = (await logs.wait_for("retention_applied"))[:1]

    assert (line["delivered_events"], line["failed_events"]) == (25, 0)
    assert (line["clicks"], line["conversations"]) == (1, 1)
    events = {row[0] for row in await db_rows(client, "SELECT event_id FROM events")}
    assert events == {"FAILED", "NEW"}  # failed ones are kept longer
    assert await db_rows(client, "SELECT COUNT(*) FROM deliveries") == [(2,)]
    # The totals survive: 25 dry runs on that day, in the daily counts.
    assert await db_rows(
        client, "SELECT account_id, event_name, status, events FROM event_daily"
    ) == [("acme", "Purchase", "dry_run", 25)]
    conversations = dict(await db_rows(client, "SELECT id, ctwa_clid FROM conversations"))
    assert conversations == {clicked.id: None, fresh.id: None}  # click cleared, quiet one gone


PHONE = "+1 650 555 0177"
DIGITS = "16505550177"
BSUID = "US.7770001112223334445"
NAME = "Erasable Person"
CLICK = "Aff-ERASE-ME-click-id-0123456789"
EMAIL = "erase.me@example.com"
SUPPRESSION_KEY = "suppression-secret-0123456789"


class Recorder:
    """An outbox sink that retries until told to deliver, and records what it was sent."""

    def __init__(self) -> None:
        self.delivering = False
        self.sent: list[str] = []

    @hookimpl
    def gateway_delivery_options(self) -> DeliveryOptions:
        return DeliveryOptions(retry_base_s=0.05, retry_cap_s=0.1, poll_s=0.05, respond_within_ms=0)

    @hookimpl
    async def gateway_send_events(self, events: list[QueuedEvent]) -> list[SendOutcome]:
        if not self.delivering:
            return [SendOutcome(status="retry", reason="down") for _ in events]
        self.sent += [e.event_id for e in events]
        return [SendOutcome(status="delivered") for _ in events]


async def capture_person(client: Client, *, other: bool = True) -> None:
    """The person messages after an ad click (phone, BSUID, name, click); someone else too."""
    people = [message(DIGITS, "wamid.ERASE1", bsuid=BSUID, ref=referral(CLICK))]
    if other:
        people.append(message("16505550100", "wamid.KEEP1", ref=referral("Aff-KEEP-click")))
    await post_signed(client, notification(messages_change(people, names={DIGITS: NAME})))


async def test_erasure_leaves_no_trace_and_cancels_pending_deliveries(
    make_client: ClientFactory, config: dict[str, Any], logs: LogCapture
) -> None:
    recorder = Recorder()
    client = await make_client(plugins={"sinks": ["recorder"]}, extra={"recorder": recorder})
    await capture_person(client)
    body = {"accountId": "acme", "eventName": "LeadSubmitted"}
    for event_id, phone, email in (
        ("THEIRS", PHONE, EMAIL),
        ("OTHERS", "+1 650 555 0100", "someone.else@example.com"),
    ):
        resp = await client.post(
            URL,
            json={**body, "eventId": event_id, "phoneE164": phone, "email": email},
            headers=AUTH,
        )
        assert resp.status == 202, await resp.text()  # the sink is retrying
    traces = [
        DIGITS.encode(),
        BSUID.encode(),
        NAME.encode(),
        CLICK.encode(),
        hash_email(EMAIL).encode(),
        # The request's checksum of the email, stored packed (four bytes).
        bytes.fromhex(
            request_fingerprint(
                ConversionRequest(
                    account_id="acme", event_name="LeadSubmitted", event_id="THEIRS", email=EMAIL
                )
            )["email"]
        ),
    ]
    before = await stored_bytes(client)
    assert all(t in before for t in traces)  # the net this test checks

    resp = await client.delete(
        "/v1/whatsapp/users", params={"accountId": "acme", "phoneE164": PHONE}, headers=AUTH
    )

    answer = await resp.json()
    assert resp.status == 200, answer
    assert answer["erased"]["conversations"] == 1
    assert answer["erased"]["deliveriesCancelled"] == 1
    assert answer["erased"]["notificationsRedacted"] == 1
    assert answer["suppressed"] is False
    # Gone from the tables, and on SQLite from the file's bytes (database, WAL, shm).
    content = await stored_bytes(client)
    for trace in traces:
        assert trace not in content, trace
    assert hash_email("someone.else@example.com").encode() in content  # not theirs: kept
    (theirs,) = await db_rows(client, "SELECT event, status FROM events WHERE event_id = 'THEIRS'")
    assert b'"em"' not in theirs[0]
    assert theirs[1] == "failed"
    # Never sent after erasure, even when the sink comes back; the other event is.
    recorder.delivering = True
    assert (await settle(client, "OTHERS"))["status"] == "delivered"
    assert recorder.sent == ["OTHERS"]
    detail = await event_detail(client, "THEIRS")
    assert detail["deliveries"][0]["errorCode"] == "erased"
    # An audit row, without who.
    (audit,) = await db_rows(client, "SELECT actor, account_id, kind, suppressed FROM erasures")
    assert audit == ("api_key:admin", "acme", "phone", 0)
    assert DIGITS not in logs.text
    assert BSUID not in logs.text


async def test_suppression_refuses_their_next_message_and_conversion(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    config["privacy"] = {"suppression_key_env": "CTWA_SUPPRESSION_KEY"}
    client = await make_client(
        settings=parse_settings(config), environ={**ENV, "CTWA_SUPPRESSION_KEY": SUPPRESSION_KEY}
    )
    await capture_person(client, other=False)
    resp = await client.delete(
        "/v1/whatsapp/users",
        params={"accountId": "acme", "businessScopedUserId": BSUID, "suppress": "true"},
        headers=AUTH,
    )
    assert (await resp.json())["erased"]["conversations"] == 1
    stored = await db_rows(client, "SELECT kind, digest FROM suppressions")
    assert stored
    assert all(len(d) == 64 for _, d in stored)
    assert hashlib.sha256(f"bsuid:{BSUID}".encode()).hexdigest() not in {d for _, d in stored}
    # They message again after another ad: nothing is captured.
    await capture_person(client, other=False)
    assert await db_rows(client, "SELECT COUNT(*) FROM conversations") == [(0,)]
    # A conversion naming them is refused with the reason.
    resp = await client.post(
        URL,
        json={"accountId": "acme", "eventName": "Purchase", "eventId": "S1",
              "businessScopedUserId": BSUID, "value": 1, "currency": "USD"},
        headers=AUTH,
    )  # fmt: skip
    body = await resp.json()
    assert (resp.status, body["code"]) == (422, "person_suppressed")


async def test_erasure_mistakes_are_400s_naming_the_field(client: Client) -> None:
    for params, param in (
        ({"accountId": "acme"}, "phoneE164"),
        (
            {"accountId": "acme", "phoneE164": PHONE, "businessScopedUserId": BSUID},
            "businessScopedUserId",
        ),
        ({"accountId": "acme", "phoneE164": "not a phone"}, "phoneE164"),
        ({"accountId": "acme", "phoneE164": PHONE, "suppress": "maybe"}, "suppress"),
    ):
        resp = await client.delete("/v1/whatsapp/users", params=params, headers=AUTH)
        body = await resp.json()
        assert resp.status == 400, body
        assert body["param"] == param
    resp = await client.delete(
        "/v1/whatsapp/users", params={"accountId": "acme", "phoneE164": PHONE, "suppress": "true"},
        headers=AUTH,
    )  # fmt: skip
    assert (resp.status, (await resp.json())["code"]) == (422, "suppression_not_configured")


@pytest.mark.sqlite_only("backs up and restores the SQLite file")
async def test_a_backup_taken_under_load_restores_every_acknowledged_event(
    make_client: ClientFactory, config: dict[str, Any], db_path: Path, tmp_path: Path
) -> None:
    client = await make_client()
    conversation = await add_conversation(store_of(client))
    acknowledged: list[str] = []

    async def post(i: int) -> None:
        await lead(client, f"B{i}", conversation.id)
        acknowledged.append(f"B{i}")

    await asyncio.gather(*(post(i) for i in range(50)))
    before = list(acknowledged)
    copy = tmp_path / "backup.sqlite3"
    load = asyncio.gather(*(post(i) for i in range(50, 150)))
    await asyncio.to_thread(backup, db_path, copy)
    await load
    assert copy.stat().st_mode & 0o777 == 0o600
    await client.close()
    # The disk is lost; the backup comes back.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    restore(copy, db_path)
    with sqlite3.connect(db_path) as conn:
        restored = {row[0] for row in conn.execute("SELECT event_id FROM events")}
    assert set(before) <= restored
    assert restored <= set(acknowledged)


def test_restore_refuses_a_damaged_copy_and_a_running_gateway(
    db_path: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConfigError, match="is not a ctwa-gateway store"):
        restore(bad, db_path)
    good = tmp_path / "good.sqlite3"

    make_store(db_path)
    backup(db_path, good)
    serving = serving_lock(db_path, shared=True)
    assert serving.acquire()
    try:
        with pytest.raises(ConfigError, match="a gateway is serving"):
            restore(good, db_path)
    finally:
        serving.release()


def test_a_backup_never_replaces_the_store_or_leaves_a_partial_copy(
    db_path: Path, tmp_path: Path
) -> None:
    make_store(db_path)
    # Swapped in under a serving gateway, a copy would lose what it acknowledged after.
    for target in (
        db_path,
        db_path.with_name(db_path.name + "-wal"),
        tmp_path / "." / db_path.name,
    ):
        with pytest.raises(UsageError, match="is the store itself"):
            backup(db_path, target)
    folder = tmp_path / "backups"
    folder.mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        backup(db_path, folder)
    # A device or a pipe is never replaced by the copy (found by review: `backup /dev/null`
    # as root replaced the host's /dev/null with the store).
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(UsageError, match="not a regular file"):
        backup(db_path, pipe)
    assert stat.S_ISFIFO(pipe.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


def test_a_restore_onto_a_fresh_host_makes_the_stores_folder(db_path: Path, tmp_path: Path) -> None:
    make_store(db_path)
    copy = tmp_path / "copy.sqlite3"
    backup(db_path, copy)
    fresh = tmp_path / "new-host" / "var" / "gateway.sqlite3"
    assert restore(copy, fresh).version > 0
    assert fresh.parent.stat().st_mode & 0o777 == 0o700
    assert fresh.stat().st_mode & 0o777 == 0o600


def make_store(path: Path) -> None:
    """Create an empty SQLite store at ``path`` (its schema migrated)."""

    async def made() -> None:
        await (await SqliteStore.open(path)).close()

    asyncio.run(made())


def config_args(config: dict[str, Any], tmp_path: Path) -> list[str]:
    """Write ``config`` to a file; return the command line's options naming it."""
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(tomli_w.dumps(config))
    return ["--config", str(config_file)]


async def seed_person(config: dict[str, Any]) -> None:
    """Store a conversation of the person, in the store ``config`` names (no app running)."""
    store = await open_store(parse_settings(config), ENV)
    try:
        await add_conversation(store, wa_id=DIGITS)
    finally:
        await store.close()


def test_cli_erase(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = config_args(config, tmp_path)
    asyncio.run(seed_person(config))
    assert main(["erase", *args, "--account", "acme", "--phone", PHONE], environ=ENV) == 0
    erased = json.loads(capsys.readouterr().out)
    assert erased["erased"]["conversations"] == 1
    assert DIGITS not in json.dumps(erased)
    assert main(["erase", *args, "--account", "acme", "--phone", "nope"], environ=ENV) == 2
    # An unset shell variable or a malformed id is refused as the API refuses it, not recorded
    # as an erasure done (found by review).
    for option, value in (("--bsuid", ""), ("--conversation", ""), ("--bsuid", " ")):
        assert main(["erase", *args, "--account", "acme", option, value], environ=ENV) == 2
    assert "erasureId" not in capsys.readouterr().out


@pytest.mark.sqlite_only("stats --store, backup and restore are commands of the SQLite file")
def test_cli_backup_restore_and_stats(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = config_args(config, tmp_path)
    asyncio.run(seed_person(config))
    assert main(["stats", "--store", "--json", *args], environ=ENV) == 0
    tables = {
        json.loads(line)["table"]: json.loads(line) for line in capsys.readouterr().out.splitlines()
    }
    assert tables["conversations"]["rows"] == 1
    assert tables["conversations"]["oldestDays"] == 0
    copy = tmp_path / "copy.sqlite3"
    assert main(["backup", *args, str(copy)], environ=ENV) == 0
    capsys.readouterr()
    # Found by review: a restore said nothing of the store it set aside, nor that people
    # erased since the backup were back.
    assert main(["erase", *args, "--account", "acme", "--phone", PHONE], environ=ENV) == 0
    erasure = json.loads(capsys.readouterr().out)["erasureId"]
    assert main(["restore", *args, str(copy)], environ=ENV) == 0
    said = capsys.readouterr()
    assert "restored" in said.out
    (aside,) = Path(config["store"]["path"]).parent.glob("*.before-restore-*")
    assert f"kept at {aside}" in said.out
    assert f"warning: 1 erasures were made after this backup was taken (#{erasure} " in said.err
    assert DIGITS not in said.out + said.err


def _event(event_id: str) -> StoredEvent:
    """An event waiting for the Meta sink (an outbox sink: its delivery is pending)."""
    pending = {"meta_capi": SinkState(status="pending")}
    return msgspec.structs.replace(new_event(event_id), deliveries=pending)


@pytest.mark.sqlite_only("backup and restore are commands of the SQLite file")
def test_a_restore_takes_over_deliveries_made_since_the_backup(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by review: deliveries pending in a backup but made since by the store it replaced
    were sent to Meta again at the next start, and Meta counts each of them twice."""
    args = config_args(config, tmp_path)
    settings = parse_settings(config)

    async def accept(*event_ids: str) -> list[int]:
        store = await open_store(settings, ENV)
        try:
            return [(await store.insert_event(_event(e)))[0].pk for e in event_ids]
        finally:
            await store.close()

    async def deliver(pk: int) -> None:
        store = await open_store(settings, ENV)
        try:
            sent = SinkState(status="delivered", attempts=1, trace_id="AbC123", events_received=1)
            await store.update_deliveries(pk, {"meta_capi": sent})
        finally:
            await store.close()

    sent_pk, _ = asyncio.run(accept("sent-since", "never-sent"))
    copy = tmp_path / "copy.sqlite3"
    assert main(["backup", *args, str(copy)], environ=ENV) == 0
    # Nothing made since: nothing to take over, and nothing said of it.
    assert main(["restore", *args, str(copy)], environ=ENV) == 0
    assert "deliveries still pending" not in capsys.readouterr().out
    asyncio.run(deliver(sent_pk))
    assert main(["restore", *args, str(copy)], environ=ENV) == 0
    said = capsys.readouterr().out
    assert "1 deliveries still pending in the backup were made since" in said
    assert "(meta_capi 1)" in said
    conn = sqlite3.connect(config["store"]["path"])
    try:
        deliveries = dict(
            conn.execute(
                "SELECT e.event_id, d.status || ' ' || d.attempts || ' '"
                " || COALESCE(d.trace_id, '') FROM deliveries d JOIN events e ON e.pk = d.event_pk"
            ).fetchall()
        )
        statuses = dict(conn.execute("SELECT event_id, status FROM events").fetchall())
        counts = dict(
            conn.execute("SELECT status, deliveries FROM delivery_counts WHERE sink = 'meta_capi'")
        )
    finally:
        conn.close()
    assert deliveries == {"sent-since": "delivered 1 AbC123", "never-sent": "pending 0 "}
    assert statuses == {"sent-since": "delivered", "never-sent": "pending"}
    assert {k: v for k, v in counts.items() if v} == {"delivered": 1, "pending": 1}


def _limited(command: list[str], config_file: Path, kib: int) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a process that may write files of at most ``kib`` KiB (a full disk:
    SQLite fails as it does on one, and Python ignores SIGXFSZ)."""
    cli = shlex.join([sys.executable, "-m", "gateway", *command, "--config", str(config_file)])
    return subprocess.run(
        ["/bin/sh", "-c", f"ulimit -f {kib * 2} && exec {cli}"],
        capture_output=True, text=True, env={**os.environ, **ENV}, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.sqlite_only("backup and restore are commands of the SQLite file")
def test_a_backup_or_restore_that_cannot_write_says_so_and_leaves_nothing_half_done(
    config: dict[str, Any], tmp_path: Path
) -> None:
    # Found by review: a full disk (or a read-only folder) made backup and restore print a
    # traceback, and a restore whose copy aside failed left an empty "before-restore" file
    # beside the store, looking like the copy it promised to keep.
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(tomli_w.dumps(config))
    asyncio.run(seed_person(config))
    store = Path(config["store"]["path"])
    copy = tmp_path / "backups" / "copy.sqlite3"
    copy.parent.mkdir()
    assert main(["backup", "--config", str(config_file), str(copy)], environ=ENV) == 0
    kib = copy.stat().st_size // 1024 // 2

    done = _limited(["backup", str(copy)], config_file, kib)
    assert done.returncode == 2
    # SQLite's own words for it (here "disk I/O error"), between what and what to do.
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"ctwa-gateway: cannot write {copy}: ")
    assert line.endswith("; an earlier backup there is left as it was")
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy.sqlite3"]
    assert restore(copy, tmp_path / "check.sqlite3").version > 0  # the earlier one, whole

    before = store.read_bytes()
    done = _limited(["restore", str(copy)], config_file, kib)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"ctwa-gateway: cannot keep the current store aside at {store}.")
    assert line.endswith(
        f"; nothing was changed: make room (or give write access) in {store.parent},"
        " then restore again"
    )
    assert list(store.parent.glob("*.before-restore-*")) == []
    assert store.read_bytes() == before

    fresh = tmp_path / "new-host" / "gateway.sqlite3"
    config_file.write_text(tomli_w.dumps({**config, "store": {"path": str(fresh)}}))
    done = _limited(["restore", str(copy)], config_file, kib)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"ctwa-gateway: cannot restore into {fresh}: ")
    assert line.endswith(
        f"; make room (or give write access) in {fresh.parent}, then restore again"
    )
    assert not fresh.exists()  # no empty store for the next start to serve


@pytest.mark.sqlite_only("stats --store and backup are commands of the SQLite file")
def test_stats_and_backup_of_a_store_that_cannot_be_read_name_the_store(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by review: [store] path naming a file that is not a store, or a folder, made
    # `stats --store`, `backup` and `restore` print a traceback.
    asyncio.run(seed_person(config))
    store = Path(config["store"]["path"])
    copy = tmp_path / "good.sqlite3"
    backup(store, copy)
    store.write_bytes(b"not a database at all" * 100)
    args = config_args(config, tmp_path)
    target = tmp_path / "copy.sqlite3"
    for command in (["stats", "--store"], ["backup", str(target)]):
        assert main([*command, *args], environ=ENV) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"ctwa-gateway: configuration error: [store] path {store} is not an SQLite database"
        ]
    # A folder: said as serve says it, not "unable to open" and advice about write access
    # (nor, for restore, "make room").
    store.unlink()
    store.mkdir()
    for command in (["stats", "--store"], ["backup", str(target)], ["restore", str(copy)]):
        assert main([*command, *args], environ=ENV) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"ctwa-gateway: configuration error: [store] path {store} is a folder;"
            " name a file in it"
        ]
    assert not target.exists()


@pytest.mark.sqlite_only("restore is a command of the SQLite file")
def test_a_restore_replaces_a_damaged_store_and_keeps_its_bytes(
    config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by review: the store a restore is for, one that is no database any more, was
    # refused (a traceback: its copy aside went through SQLite, which cannot read it), and
    # commands on a damaged one said to free space.
    args = config_args(config, tmp_path)
    asyncio.run(seed_person(config))
    copy = tmp_path / "copy.sqlite3"
    assert main(["backup", *args, str(copy)], environ=ENV) == 0
    store = Path(config["store"]["path"])

    # Pages overwritten (the header still says SQLite): commands say it is damaged.
    with store.open("r+b") as file:
        file.seek(4096)
        file.write(b"\xff" * 16384)
    capsys.readouterr()
    assert main(["stats", "--store", *args], environ=ENV) == 1
    assert capsys.readouterr().err.splitlines() == [
        "ctwa-gateway: the store is damaged (database disk image is malformed): restore the"
        " latest backup (ctwa-gateway restore PATH; the damaged file is kept aside)"
    ]

    garbage = b"not a database at all" * 100
    store.write_bytes(garbage)
    for suffix in ("-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    assert main(["restore", *args, str(copy)], environ=ENV) == 0
    (aside,) = store.parent.glob("*.before-restore-*")
    out, err = capsys.readouterr()
    assert f"kept at {aside}" in out
    # What the damaged store erased since the backup cannot be read: the operator is told,
    # where nothing was said and the erased people were back without a word.
    assert "erasures made after this backup was taken are unknown" in err
    # So are the deliveries it made: those pending in the backup may have been received.
    assert "deliveries it made after this backup was taken are unknown" in err
    assert aside.read_bytes() == garbage
    assert stat.S_IMODE(aside.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert main(["stats", "--store", "--json", *args], environ=ENV) == 0
    tables = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {t["table"]: t["rows"] for t in tables}["conversations"] == 1


@pytest.mark.sqlite_only("restore is a command of the SQLite file")
def test_restores_in_the_same_second_keep_each_replaced_store(
    db_path: Path, tmp_path: Path
) -> None:
    # Found by review: the copy kept aside is named by the second; a second restore within it
    # wrote its copy over the first one's, and the store the first replaced (the only copy
    # of what it held) was gone.
    make_store(db_path)
    copy = tmp_path / "copy.sqlite3"
    backup(db_path, copy)
    conn = sqlite3.connect(db_path)  # what only the store the first restore replaces holds
    conn.execute("CREATE TABLE only_in_the_original (n INTEGER)")
    conn.commit()
    conn.close()
    asides = [restore(copy, db_path).aside for _ in range(3)]  # well within two seconds
    assert len(set(asides)) == 3
    assert all(a is not None and a.exists() for a in asides)
    first = sqlite3.connect(f"file:{asides[0]}?mode=ro", uri=True)
    try:
        names = {row[0] for row in first.execute("SELECT name FROM sqlite_master")}
    finally:
        first.close()
    assert "only_in_the_original" in names
