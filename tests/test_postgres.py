"""What only PostgreSQL has to get right: several replicas racing on one database, a lost
connection, and settings for the engine. (The behaviour both engines share is tested on both
by the modules that set ``BOTH_ENGINES``.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import tomli_w
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.cli import main
from gateway.config import parse_settings
from gateway.errors import ConfigError
from gateway.http.keys import PIPELINE
from gateway.store.archive import NewNotification
from gateway.store.copy import tables
from gateway.store.database import SqliteStore
from gateway.store.pg_schema import PG_MIGRATIONS
from gateway.store.postgres import PgTx, PostgresStore, StoreUnavailable
from gateway.store.retention import PruneConversations
from tests.conftest import (
    ACME_TOKEN,
    AUTH,
    ENV,
    ClientFactory,
    add_conversation,
    base_config,
    db_rows,
    store_of,
)
from tests.console_seed import seed
from tests.fake_graph import FakeGraph
from tests.payloads import (
    encode,
    message,
    messages_change,
    notification,
    referral,
    signed,
    system_message,
)
from tests.postgres import (
    PostgresCluster,
    create_database,
    database_url,
    sessions_waiting_on_locks,
)

Client = TestClient[web.Request, web.Application]
URL = "/v1/whatsapp/conversions"
WEBHOOK = "/webhooks/whatsapp"


@pytest.fixture
def engine() -> str:
    return "postgresql"


async def _replicas(make_client: ClientFactory, count: int) -> list[Client]:
    # Each client is a gateway of its own (its own pool, writer and dispatchers) on the
    # one database the config names: replicas, as far as the database can tell.
    return [await make_client() for _ in range(count)]


def _lead(conversation_id: str, event_id: str) -> dict[str, Any]:
    return {
        "accountId": "acme",
        "eventName": "LeadSubmitted",
        "eventId": event_id,
        "conversationId": conversation_id,
    }


async def test_two_replicas_capturing_one_notification_at_once_capture_it_once(
    make_client: ClientFactory,
) -> None:
    # Meta retries a notification it thinks was lost; the retry reaches another replica
    # while the first is still writing it.
    first, second = await _replicas(make_client, 2)
    body = encode(
        notification(
            messages_change(
                [message(f"4479111{i:05d}", f"wamid.race{i}", ref=referral(f"clid-{i}"))
                 for i in range(50)]
            )
        )
    )  # fmt: skip
    answers = await asyncio.gather(
        *(c.post(WEBHOOK, data=body, headers=signed(body)) for c in (first, second) * 3)
    )
    assert [a.status for a in answers] == [200] * 6
    assert await db_rows(first, "SELECT COUNT(*) FROM conversations") == [(50,)]
    assert await db_rows(first, "SELECT COUNT(*) FROM webhook_messages") == [(50,)]
    clicks = await db_rows(first, "SELECT COUNT(*) FROM conversations WHERE ctwa_clid IS NOT NULL")
    assert clicks == [(50,)]
    # The replica that lost the race saw the winner's rows at once (duplicates): nothing was
    # left pending for a later reprocessing.
    assert await db_rows(
        first, "SELECT COUNT(*) FROM webhook_notifications WHERE status != 'processed'"
    ) == [(0,)]
    captured = [(await a.json())["clicksCaptured"] for a in answers]
    assert sorted(captured) == [0, 0, 0, 0, 0, 50]


async def test_a_phone_number_change_raced_on_two_replicas_leaves_one_live_conversation(
    make_client: ClientFactory,
) -> None:
    first, second = await _replicas(make_client, 2)
    hello = encode(
        notification(messages_change([message("447911000001", "wamid.h1", ref=referral("c"))]))
    )
    assert (await first.post(WEBHOOK, data=hello, headers=signed(hello))).status == 200
    changed = system_message(
        "wamid.h2", "user_changed_number", wa_id="447911000001", new_wa_id="447911000002"
    )
    change = encode(notification(messages_change([changed])))
    answers = await asyncio.gather(
        *(c.post(WEBHOOK, data=change, headers=signed(change)) for c in (first, second))
    )
    assert [a.status for a in answers] == [200, 200]
    live = await db_rows(
        first,
        "SELECT wa_id FROM conversations WHERE superseded_by IS NULL AND phone_released_at IS NULL",
    )
    assert live == [("447911000002",)]


async def test_one_event_id_sent_to_three_replicas_at_once_is_stored_once(
    make_client: ClientFactory,
) -> None:
    replicas = await _replicas(make_client, 3)
    conversation = await add_conversation(store_of(replicas[0]))
    answers = await asyncio.gather(
        *(
            replica.post(URL, json=_lead(conversation.id, f"E{i % 20}"), headers=AUTH)
            for i, replica in enumerate(replicas * 20)
        )
    )
    statuses = Counter(a.status for a in answers)
    assert set(statuses) == {200}, statuses
    assert await db_rows(replicas[0], "SELECT COUNT(*) FROM events") == [(20,)]
    counts = await db_rows(replicas[0], "SELECT SUM(deliveries) FROM delivery_counts")
    assert int(counts[0][0]) == 20  # each stored event counted once, not per request


async def test_a_lost_database_answers_503_and_recovers_without_a_restart(
    client: Client, pg_url: str, pg_server: str
) -> None:
    conversation = await add_conversation(store_of(client))
    name = urlsplit(pg_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_server)
    try:
        # The database goes away: no new connections, and the pool's are cut.
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await _end_sessions(admin, name)
        resp = await client.post(URL, json=_lead(conversation.id, "down"), headers=AUTH)
        body = await resp.json()
        assert resp.status == 503, body
        assert body["code"] == "store_unavailable"
        assert resp.headers["Retry-After"] == "1"
        ready = await client.get("/readyz")
        assert ready.status == 503
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        await admin.close()
    # Back: the same gateway takes the retry.
    resp = await client.post(URL, json=_lead(conversation.id, "down"), headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert (await client.get("/readyz")).status == 200


async def _sessions_start_read_only(admin: asyncpg.Connection, name: str, on: bool) -> None:
    """Make database ``name``'s sessions read-only (or writable again), ending the open ones
    so that every new session starts so."""
    await admin.execute(
        f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}'
    )
    await _end_sessions(admin, name)


async def _end_sessions(admin: asyncpg.Connection, name: str) -> None:
    """End every session of database ``name`` but ``admin``'s (the gateway's pool included)."""
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = $1 AND pid != pg_backend_pid()",
        name,
    )


async def test_readyz_is_503_while_the_database_takes_no_writes(
    client: Client, pg_url: str, pg_server: str
) -> None:
    # Found by review: /readyz's empty transaction commits on a read-only database (a
    # primary demoted to a standby, a full disk's emergency setting), so a load balancer kept
    # sending conversions to a replica that answered each with 503.
    conversation = await add_conversation(store_of(client))
    name = urlsplit(pg_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_server)
    try:
        await _sessions_start_read_only(admin, name, True)
        statuses = [
            (await client.post(URL, json=_lead(conversation.id, f"ro{i}"), headers=AUTH)).status
            for i in range(3)
        ]
        assert statuses[-1] == 503, statuses
        ready = await client.get("/readyz")
        body = await ready.json()
        assert ready.status == 503, body
        assert "read-only" in body["details"]["checks"]["store"]
        assert name not in str(body)
        await _sessions_start_read_only(admin, name, False)
    finally:
        await admin.close()
    # Writable again: ready once a check's probe writes, no conversion needed. The first check
    # may still meet a pool connection the switch back terminated ("connection lost"): that
    # write failed, and the pool's next connection is a new one.
    for _ in range(20):
        ready = await client.get("/readyz")
        if ready.status == 200:
            break
        await asyncio.sleep(0.1)
    assert ready.status == 200, await ready.text()
    resp = await client.post(URL, json=_lead(conversation.id, "ro-after"), headers=AUTH)
    assert resp.status == 200


async def test_a_replica_that_wrote_nothing_is_not_ready_on_a_read_only_database(
    make_client: ClientFactory, client: Client, pg_url: str, pg_server: str
) -> None:
    # Found by review: the ping's empty transaction commits on a read-only database, and
    # only a write that failed made a replica not ready; with several replicas, each stayed
    # in the load balancer's rotation until a conversion of its own had failed.
    other = await make_client()
    assert (await other.get("/readyz")).status == 200
    name = urlsplit(pg_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_server)
    try:
        await _sessions_start_read_only(admin, name, True)
        for replica in (client, other):  # neither has written since
            # A check may first meet a pool connection the switch terminated (not ready:
            # "connection lost"); the next ones find the database read-only.
            for _ in range(20):
                ready = await replica.get("/readyz")
                body = await ready.json()
                assert ready.status == 503, body
                if "read-only" in body["details"]["checks"]["store"]:
                    break
                await asyncio.sleep(0.1)
            assert "read-only" in body["details"]["checks"]["store"], body
        await _sessions_start_read_only(admin, name, False)
    finally:
        await admin.close()
    for replica in (client, other):
        for _ in range(20):
            ready = await replica.get("/readyz")
            if ready.status == 200:
                break
            await asyncio.sleep(0.1)
        assert ready.status == 200, await ready.text()


async def test_a_database_that_stops_answering_is_a_quick_503_not_a_500(
    make_client: ClientFactory, config: dict[str, Any], pg_url: str
) -> None:
    # Found by review: a frozen server (or a lock held too long) was a 500 internal_error
    # after two minutes (the statement timeout, then again for the write tried alone).
    store = {**config["store"], "command_timeout_s": 1}
    client = await make_client(settings=parse_settings({**config, "store": store}))
    conversation = await add_conversation(store_of(client))
    blocker = await asyncpg.connect(pg_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        # Every read and write of conversations now waits, as on a server that stopped.
        await blocker.execute("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        resp = await client.post(URL, json=_lead(conversation.id, "hung"), headers=AUTH)
        took = time.monotonic() - started
        await tx.rollback()
    finally:
        await blocker.close()
    body = await resp.json()
    assert (resp.status, body["code"]) == (503, "store_unavailable"), body
    assert resp.headers["Retry-After"] == "1"
    assert took < 5, took
    # The database answers again: the retry is taken.
    resp = await client.post(URL, json=_lead(conversation.id, "hung"), headers=AUTH)
    assert resp.status == 200, await resp.json()


async def test_an_erasure_that_committed_is_not_answered_nothing_was_accepted(
    make_client: ClientFactory, config: dict[str, Any], pg_url: str
) -> None:
    # Found by review: the erasure committed, then its VACUUM (behind a lock here; on a big
    # table, slow) timed out and the answer was 503 "nothing was accepted".
    store = {**config["store"], "command_timeout_s": 1}
    client = await make_client(settings=parse_settings({**config, "store": store}))
    await add_conversation(store_of(client), wa_id="16505551234")
    blocker = await asyncpg.connect(pg_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        # Compatible with every lock the erasure itself takes; only VACUUM waits on it.
        await blocker.execute("LOCK TABLE webhook_notifications IN SHARE UPDATE EXCLUSIVE MODE")
        resp = await client.delete(
            "/v1/whatsapp/users",
            headers=AUTH,
            params={"accountId": "acme", "phoneE164": "+16505551234"},
        )
        answer = await resp.json()
        await tx.rollback()
    finally:
        await blocker.close()
    erased = await db_rows(client, "SELECT COUNT(*) FROM erasures")
    conversations = await db_rows(client, "SELECT COUNT(*) FROM conversations")
    assert (erased, conversations) == ([(1,)], [(0,)])  # the erasure was made...
    assert resp.status == 200, answer


async def test_one_slow_op_does_not_fail_the_writes_committed_beside_it(
    make_client: ClientFactory, config: dict[str, Any], pg_url: str
) -> None:
    # Found by review: one statement that timed out (a lock wait, a slow erasure) failed
    # every write of its group commit as the database being unavailable.
    store_cfg = {**config["store"], "command_timeout_s": 1}
    client = await make_client(settings=parse_settings({**config, "store": store_cfg}))
    store = store_of(client)
    locked = await add_conversation(store, wa_id="16505550001")
    blocker = await asyncpg.connect(pg_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", locked.id)
        erasure, innocent = await asyncio.gather(
            store.erase(
                account_id="acme",
                waba_id="x",
                phone_number_id="x",
                kind="phone",
                phones=["16505550001"],
                bsuids=[],
                conversation_ids=[],
                actor="test",
                suppress=False,
            ),
            add_conversation(store, wa_id="16505550002"),
            return_exceptions=True,
        )
        await tx.rollback()
    finally:
        await blocker.close()
    assert isinstance(erasure, StoreUnavailable)  # the op that waited: fair
    assert not isinstance(innocent, BaseException), repr(innocent)


async def test_a_url_with_a_password_must_come_from_the_environment(tmp_path: Any) -> None:
    config = base_config(tmp_path / "unused.sqlite3")
    config["store"] = {"url": "postgresql://gateway:s3cret@db.internal/ctwa"}
    with pytest.raises(ConfigError) as error:
        parse_settings(config)
    assert "url_env" in str(error.value)
    assert "s3cret" not in str(error.value)


async def test_an_unreachable_database_is_a_clear_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as error:
        await PostgresStore.open(
            "postgresql://gateway:s3cret@127.0.0.1:9/ctwa", min_connections=1, max_connections=3
        )
    message = str(error.value)
    assert "cannot connect to the PostgreSQL store" in message
    assert "s3cret" not in message


async def test_store_copy_moves_every_row_into_postgresql_and_refuses_a_full_target(
    tmp_path: Any, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "old.sqlite3"
    sqlite = await SqliteStore.open(db)
    try:
        await seed(sqlite)
        # The webhook archive, a delivery attempt and a dataset too.
        body = encode(notification(messages_change([message("447911000009", "wamid.c1")])))
        await sqlite.archive_pending(
            NewNotification(body=body, received_at=1.0, request_id="r1"), error="Boom"
        )
        await sqlite.save_dataset("acme", "1234567890")
        event = await sqlite.find_event("acme", "order-a1-1")
        assert event is not None
    finally:
        await sqlite.close()

    # The CLI runs its own loop: off this one's thread.
    argv = ["store", "copy", "--from", f"sqlite:///{db}", "--to", "env:TARGET"]
    assert await asyncio.to_thread(main, argv, environ={"TARGET": pg_url}) == 0
    out = capsys.readouterr().out
    assert "every table's count matches" in out

    source = await SqliteStore.open(db, create=False)
    target = await PostgresStore.open(pg_url, min_connections=1, max_connections=3)
    try:
        for table in tables():
            key = ", ".join(table.key)
            # Names from the store's own schema.
            sql = f"SELECT {', '.join(table.columns)} FROM {table.name} ORDER BY {key}"  # noqa: S608
            assert await target.query(sql) == await source.query(sql), table.name
        # The copy is a working store: new rows do not collide with the copied keys.
        conversation = await add_conversation(target)
        assert await target.get_conversation("acme", conversation.id) == conversation
        assert await target.find_event("acme", event.event_id) == event
    finally:
        await source.close()
        await target.close()

    # A second copy into the now full database writes nothing.
    argv = ["store", "copy", "--from", f"sqlite:///{db}", "--to", pg_url]
    code = await asyncio.to_thread(main, argv)
    assert code == 2
    assert "not empty" in capsys.readouterr().err


async def test_store_copy_refuses_a_store_a_newer_version_migrated(
    tmp_path: Any, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by review (helper 37): an older version runs on a newer PostgreSQL schema (a
    # rolling upgrade), and its copy would have taken only the columns it knows.
    store = await PostgresStore.open(pg_url, min_connections=1, max_connections=2)
    try:
        await seed(store)
    finally:
        await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO schema_migrations VALUES ($1)", len(PG_MIGRATIONS) + 1)
    finally:
        await conn.close()

    argv = ["store", "copy", "--from", pg_url, "--to", f"sqlite:///{tmp_path / 'new.sqlite3'}"]
    assert await asyncio.to_thread(main, argv) == 2

    err = capsys.readouterr().err
    assert f"the source store has schema version {len(PG_MIGRATIONS) + 1}" in err
    assert "nothing was written" in err


async def test_a_replicas_new_event_wakes_the_others_dispatchers_at_once(
    make_client: ClientFactory, config: dict[str, Any], aiohttp_server: Any
) -> None:
    # Nobody polls (poll_s 300): the only way the second replica learns of the first's events
    # is the database's NOTIFY. The first sends one event at a time and Meta takes 1.5 s, so
    # two events are both delivered within 2.5 s only if the second replica took one.
    fake = FakeGraph(tokens={"1234567890": ACME_TOKEN}, delay_s=1.5)
    graph = await aiohttp_server(fake.app())
    meta = {"graph_url": str(graph.make_url("")).rstrip("/"), "poll_s": 300,
            "respond_within_ms": 0, "batch_max": 1, "max_in_flight": 1}  # fmt: skip
    settings = parse_settings({**config, "plugins": {"sinks": ["meta_capi"], "meta_capi": meta}})
    first = await make_client(settings=settings)
    second = await make_client(settings=settings)
    await asyncio.sleep(0.2)  # both listening
    conversation = await add_conversation(store_of(first))
    for event_id in ("N1", "N2"):
        resp = await first.post(URL, json=_lead(conversation.id, event_id), headers=AUTH)
        assert resp.status == 202
    for _ in range(50):
        if sorted(fake.event_ids()) == ["N1", "N2"]:
            break
        await asyncio.sleep(0.05)
    assert sorted(fake.event_ids()) == ["N1", "N2"], "the second replica was never woken"
    assert second is not first


async def test_a_stopped_server_on_a_unix_socket_is_a_503(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    # The README's own example connects through a socket; with the server gone the socket
    # file is too, and the operating system says "no such file", not "connection refused".
    cluster = await asyncio.to_thread(PostgresCluster.start)
    try:
        url = database_url(cluster.url, await create_database(cluster.url))
        client = await make_client(settings=parse_settings({**config, "store": {"url": url}}))
        conversation = await add_conversation(store_of(client))
    finally:
        await asyncio.to_thread(cluster.stop)
    resp = await client.post(URL, json=_lead(conversation.id, "gone"), headers=AUTH)
    body = await resp.json()
    assert (resp.status, body["code"]) == (503, "store_unavailable"), body
    assert (await client.get("/readyz")).status == 503


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://ctwa@/ctwa?host=/run/postgresql&password=S3cretPW", "url_env"),
        ("postgresql://u:S3cretPW@[::1/ctwa", "not a valid URL"),
    ],
)
def test_a_store_url_with_a_password_anywhere_or_malformed_is_refused_cleanly(
    tmp_path: Any, url: str, says: str
) -> None:
    config = base_config(tmp_path / "unused.sqlite3")
    config["store"] = {"url": url}
    with pytest.raises(ConfigError) as error:
        parse_settings(config)
    assert says in str(error.value)
    assert "S3cretPW" not in str(error.value)


def test_check_config_says_when_url_env_is_not_set(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config = base_config(tmp_path / "unused.sqlite3")
    config["store"] = {"url_env": "CTWA_DATABASE_URL"}
    path = tmp_path / "gateway.toml"
    path.write_bytes(tomli_w.dumps(config).encode())
    assert main(["check-config", "--config", str(path)], environ=ENV) != 0
    printed = capsys.readouterr()
    assert "CTWA_DATABASE_URL" in printed.out + printed.err


async def test_an_erasure_on_postgresql_does_not_claim_the_files_are_clear(
    client: Client,
) -> None:
    conversation = await add_conversation(store_of(client))
    resp = await client.delete(
        "/v1/whatsapp/users",
        params={"accountId": "acme", "conversationId": conversation.id},
        headers=AUTH,
    )
    answer = await resp.json()
    assert resp.status == 200, answer
    assert answer["erased"]["conversations"] == 1
    assert answer["fileCleared"] is False


async def test_store_copy_keeps_a_sqlite_text_with_a_nul_and_refuses_an_unknown_scheme(
    tmp_path: Any, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "old.sqlite3"
    sqlite = await SqliteStore.open(db)
    try:
        conversation = await add_conversation(sqlite)
    finally:
        await sqlite.close()
    # An older version kept Meta's display texts as sent, NULs included.
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE conversations SET ctwa_headline = ?", ("Sum\u0000mer",))
    argv = ["store", "copy", "--from", f"sqlite:///{db}", "--to", pg_url]
    assert await asyncio.to_thread(main, argv) == 0, capsys.readouterr().err
    target = await PostgresStore.open(pg_url, min_connections=1, max_connections=3)
    try:
        rows = await target.query("SELECT id, ctwa_headline FROM conversations")
        assert rows == [(conversation.id, "Summer")]
    finally:
        await target.close()
    argv = ["store", "copy", "--from", "mysql://x/y", "--to", pg_url]
    assert await asyncio.to_thread(main, argv) == 2
    assert "mysql:// is not a store" in capsys.readouterr().err


async def test_commands_on_the_store_read_its_url_from_the_environment(
    pg_url: str, tmp_path: Any
) -> None:
    # The layout "Scaling out" recommends: the URL (with its password) in a variable.
    # replay and webhooks were handed an empty environment and said it was not set.
    config = base_config(tmp_path / "unused.sqlite3")
    config["store"] = {"url_env": "CTWA_DATABASE_URL"}
    path = tmp_path / "gateway.toml"
    path.write_bytes(tomli_w.dumps(config).encode())
    env = {**os.environ, **ENV, "CTWA_DATABASE_URL": pg_url}
    for command in (
        ["webhooks", "list"],
        ["webhooks", "reprocess"],
        ["replay", "--account", "acme"],
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *command, "--config", str(path),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert "not set" not in out.decode(), (command, out.decode())
        if command[0] == "webhooks":
            assert proc.returncode == 0, (command, out.decode())


async def test_a_request_hears_of_its_event_delivered_by_another_replica(
    make_client: ClientFactory, config: dict[str, Any], aiohttp_server: Any
) -> None:
    # The request waits (respond_within_ms) for its event's first attempt. Here the replica
    # that accepts it does not send (its dispatcher is stopped); the other one, woken by the
    # database, sends it at once. The answer must say so, not wait out the 2 s and say 202.
    fake = FakeGraph(tokens={"1234567890": ACME_TOKEN})
    graph = await aiohttp_server(fake.app())
    meta = {"graph_url": str(graph.make_url("")).rstrip("/"), "respond_within_ms": 2000}
    settings = parse_settings({**config, "plugins": {"sinks": ["meta_capi"], "meta_capi": meta}})
    first = await make_client(settings=settings)
    second = await make_client(settings=settings)
    delivery = first.app[PIPELINE].delivery
    assert delivery is not None
    await delivery.dispatchers["meta_capi"].stop()
    await asyncio.sleep(0.2)  # the second is listening
    conversation = await add_conversation(store_of(first))
    for event_id in ("R1", "R2", "R3"):
        started = time.monotonic()
        resp = await first.post(URL, json=_lead(conversation.id, event_id), headers=AUTH)
        answer = await resp.json()
        assert (resp.status, answer["status"]) == (200, "delivered"), answer
        assert answer["eventsReceived"] == 1
        assert time.monotonic() - started < 1.5
    assert sorted(fake.event_ids()) == ["R1", "R2", "R3"]
    assert second is not first


async def test_a_click_captured_while_housekeeping_deletes_its_conversation_is_kept(
    make_client: ClientFactory, pg_url: str
) -> None:
    # A quiet conversation without a click: housekeeping on another replica deletes it while
    # this one captures a click for it. The capture read the row before the deletion
    # committed; it must not write into a row that is gone, but start the person afresh.
    client = await make_client()
    quiet = await add_conversation(store_of(client), clid=None, last_inbound_at=time.time() - 3600)
    body = encode(
        notification(messages_change([message(quiet.wa_id, "wamid.late", ref=referral("late"))]))
    )
    housekeeping = await asyncpg.connect(pg_url)
    try:
        async with housekeeping.transaction():
            assert await PruneConversations(time.time(), 100).apply(PgTx(housekeeping)) == 1
            posting = asyncio.ensure_future(client.post(WEBHOOK, data=body, headers=signed(body)))
            await sessions_waiting_on_locks(pg_url, watching=(posting,), finishing_is_enough=True)
        answer = await posting
    finally:
        await housekeeping.close()
    assert answer.status == 200
    assert (await answer.json())["clicksCaptured"] == 1
    live = await db_rows(
        client, "SELECT id, ctwa_clid FROM conversations WHERE wa_id = ?", quiet.wa_id
    )
    assert [clid for _, clid in live] == ["late"]
    assert live[0][0] != quiet.id


async def test_housekeeping_leaves_a_quiet_conversation_whose_click_is_being_captured(
    make_client: ClientFactory, pg_url: str
) -> None:
    client = await make_client()
    store = store_of(client)
    quiet = await add_conversation(store, clid=None, last_inbound_at=time.time() - 3600)
    capture = await asyncpg.connect(pg_url)
    try:
        async with capture.transaction():
            # Another replica's capture, writing the click into the row, not committed yet.
            await capture.execute(
                "UPDATE conversations SET ctwa_clid = 'late', last_inbound_at = $1 WHERE id = $2",
                time.time(),
                quiet.id,
            )
            pruning = asyncio.ensure_future(
                store.writer.submit(PruneConversations(time.time(), 100))
            )
            await sessions_waiting_on_locks(pg_url, watching=(pruning,), finishing_is_enough=True)
        assert await pruning == 0
    finally:
        await capture.close()
    assert await db_rows(client, "SELECT ctwa_clid FROM conversations WHERE id = ?", quiet.id) == [
        ("late",)
    ]
