"""Data lifecycle: retention, erasure on request, suppression, backup and restore, store stats."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import parse_settings
from tests.conftest import AUTH, ClientFactory, LogCapture, add_conversation, store_of

Client = TestClient[web.Request, web.Application]
URL = "/v1/whatsapp/conversions"
DAY = 86400


def query(db: Path, sql: str, *params: Any) -> list[Any]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def age(db: Path, sql: str, *params: Any) -> None:
    """Run an UPDATE that makes rows look older (received_at, created_at...)."""
    with sqlite3.connect(db) as conn:
        conn.execute(sql, params)


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
    make_client: ClientFactory, config: dict[str, Any], db_path: Path, logs: LogCapture
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
    age(db_path, "UPDATE events SET received_at = ? WHERE event_id != 'NEW'", now - 100 * DAY)
    age(db_path, "UPDATE events SET status = 'failed' WHERE event_id = 'FAILED'")
    age(
        db_path,
        "UPDATE conversations SET ctwa_clicked_at = ? WHERE id = ?",
        now - 40 * DAY,
        clicked.id,
    )
    age(
        db_path,
        "UPDATE conversations SET created_at = ?, last_inbound_at = ? WHERE id = ?",
        now - 91 * DAY,
        now - 91 * DAY,
        quiet.id,
    )

    (line,) = (await logs.wait_for("retention_applied"))[:1]

    assert (line["delivered_events"], line["failed_events"]) == (25, 0)
    assert (line["clicks"], line["conversations"]) == (1, 1)
    events = {row[0] for row in query(db_path, "SELECT event_id FROM events")}
    assert events == {"FAILED", "NEW"}  # failed ones are kept longer
    assert query(db_path, "SELECT COUNT(*) FROM deliveries") == [(2,)]
    # The totals survive: 25 dry runs on that day, in the daily counts.
    assert query(db_path, "SELECT account_id, event_name, status, events FROM event_daily") == [
        ("acme", "Purchase", "dry_run", 25)
    ]
    conversations = dict(query(db_path, "SELECT id, ctwa_clid FROM conversations"))
    assert conversations == {clicked.id: None, fresh.id: None}  # click cleared, quiet one gone
