"""Two gateway processes capturing for the same person at the same moment, on one store: the
outcome is one of the orders the two notifications could have come in one after the other.

A capture reads the person's conversations and writes whole rows back. SQLite's write
transaction holds the file from its first read; on PostgreSQL two replicas interleave, and
without a check the later write put back the copy it had read over the earlier one's (a second
click, an undone number change, a recovered click wiped). Each test races 40 people one pair of
notifications at a time, so nearly every pair overlaps; they run on both engines.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.store.database import SqliteStore, Store
from gateway.store.postgres import PostgresStore
from tests.conftest import API_KEY
from tests.live import Replicas
from tests.payloads import (
    automatic_change,
    encode,
    message,
    messages_change,
    notification,
    referral,
    signed,
    system_message,
)

BOTH_ENGINES = True
PEOPLE = 40
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
WEBHOOK = "/webhooks/whatsapp"


@pytest.fixture
def store_url(engine: str, request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("pg_url") if engine == "postgresql" else None


@pytest.fixture
async def replicas(tmp_path: Path, store_url: str | None) -> AsyncIterator[Replicas]:
    # Nothing is delivered: the graph URL is never called.
    two = Replicas(tmp_path, 2, "http://127.0.0.1:9", store_url=store_url)
    try:
        await two.start_all()
        yield two
    finally:
        await two.stop_all()


async def _rows(replicas: Replicas, sql: str) -> list[tuple[Any, ...]]:
    """Query the replicas' store once they have stopped."""
    store: Store
    if replicas.store_url is None:
        store = await SqliteStore.open(replicas.db)
    else:
        store = await PostgresStore.open(replicas.store_url, min_connections=1, max_connections=1)
    try:
        return [tuple(row) for row in await store.query(sql)]
    finally:
        await store.close()


async def _post(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> Any:
    body = encode(payload)
    async with session.post(url, data=body, headers=signed(body)) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
        return answer


def _phone(p: int) -> str:
    return f"1650555{p:04d}"


def _clid(tag: str) -> str:
    return f"Aff-{tag}-" + "x" * 40


def _says(p: int, text: str, *, ts: float, clid: str | None = None) -> dict[str, Any]:
    """A notification of one message of person ``p``."""
    ref = None if clid is None else referral(clid)
    return notification(messages_change([message(_phone(p), text, ts=ts, ref=ref)]))


async def _seed(session: aiohttp.ClientSession, hook: str, wamid: str, ts: float) -> None:
    """A conversation without a click yet for each person (their message ``wamid`` and the
    person's number), through one replica."""
    await asyncio.gather(
        *(_post(session, hook, _says(p, f"{wamid}{p}", ts=ts)) for p in range(PEOPLE))
    )


async def test_two_clicks_at_once_on_two_replicas_capture_one_and_keep_it(
    replicas: Replicas,
) -> None:
    now = float(int(time.time()))  # Meta's timestamps are whole seconds
    hooks = [replicas.url(i, WEBHOOK) for i in range(2)]
    async with aiohttp.ClientSession() as session:
        # A conversation without a click yet for each person.
        await _seed(session, hooks[0], "wamid.seed", now - 60)
        answers = []
        for p in range(PEOPLE):
            a = _says(p, f"wamid.a{p}", ts=now - 10, clid=_clid(f"A{p}"))
            b = _says(p, f"wamid.b{p}", ts=now - 5, clid=_clid(f"B{p}"))
            answers.append(
                await asyncio.gather(_post(session, hooks[0], a), _post(session, hooks[1], b))
            )
    await replicas.stop_all()
    rows = await _rows(
        replicas,
        "SELECT wa_id, ctwa_clid, last_inbound_at FROM conversations WHERE superseded_by IS NULL",
    )
    stored = {phone: (clid, last) for phone, clid, last in rows}
    assert len(stored) == PEOPLE
    wrong = []
    for p, (a, b) in enumerate(answers):
        # The second click, within the first's attribution window, is ignored: only the
        # click the capturing replica reported is stored, and the later message's time.
        captured = [tag for tag, answer in (("A", a), ("B", b)) if answer["clicksCaptured"]]
        clid, last = stored[_phone(p)]
        if len(captured) != 1 or clid != _clid(f"{captured[0]}{p}") or last != now - 5:
            wrong.append((p, captured, clid and clid[:8], last and now - last))
    assert not wrong, f"{len(wrong)} of {PEOPLE}: {wrong[:5]}"


async def test_a_number_change_is_kept_when_an_older_message_is_captured_at_once_elsewhere(
    replicas: Replicas,
) -> None:
    now = float(int(time.time()))  # Meta's timestamps are whole seconds
    hooks = [replicas.url(i, WEBHOOK) for i in range(2)]
    new = [f"1650777{p:04d}" for p in range(PEOPLE)]
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(
            *(_post(session, hooks[0], _says(p, f"wamid.seed{p}", ts=now - 60, clid=_clid(f"C{p}")))
              for p in range(PEOPLE))
        )  # fmt: skip
        for p in range(PEOPLE):
            change = notification(messages_change([system_message(
                f"wamid.chg{p}", "user_changed_number", wa_id=_phone(p), new_wa_id=new[p],
                ts=now - 5)]))  # fmt: skip
            # Sent from the old number just before the change: it belongs to the
            # conversation, which stays under the new number.
            text = _says(p, f"wamid.txt{p}", ts=now - 6)
            await asyncio.gather(_post(session, hooks[0], change), _post(session, hooks[1], text))
        unresolved = []
        for p in range(PEOPLE):
            body = {"accountId": "acme", "eventName": "Purchase", "eventId": f"e{p}",
                    "phoneE164": f"+{new[p]}", "value": 1, "currency": "USD"}  # fmt: skip
            url = replicas.url(p % 2, "/v1/whatsapp/conversions")
            async with session.post(url, json=body, headers=HEADERS) as resp:
                if resp.status >= 300:
                    unresolved.append((p, resp.status))
    await replicas.stop_all()
    rows = await _rows(
        replicas, "SELECT wa_id, ctwa_clid FROM conversations WHERE superseded_by IS NULL"
    )
    live = dict(rows)
    lost = [p for p in range(PEOPLE) if live.get(new[p]) != _clid(f"C{p}") or _phone(p) in live]
    assert not lost, f"{len(lost)} of {PEOPLE} lost their number change or click: {lost[:5]}"
    assert not unresolved, f"{len(unresolved)} conversions by the new number: {unresolved[:5]}"


async def test_a_recovered_click_stays_when_a_message_is_captured_at_once_elsewhere(
    replicas: Replicas,
) -> None:
    now = float(int(time.time()))  # Meta's timestamps are whole seconds
    hooks = [replicas.url(i, WEBHOOK) for i in range(2)]
    async with aiohttp.ClientSession() as session:
        await _seed(session, hooks[0], "wamid.s", now - 60)
        for p in range(PEOPLE):
            # The click of the first message, recovered from Meta's automatic event, while
            # the person's next message (no click of its own) is captured on the other.
            event = {"id": f"wamid.s{p}", "event_name": "Purchase", "timestamp": int(now),
                     "ctwa_clid": _clid(f"R{p}")}  # fmt: skip
            await asyncio.gather(
                _post(session, hooks[0], notification(automatic_change([event]))),
                _post(session, hooks[1], _says(p, f"wamid.t{p}", ts=now - 30)),
            )
    await replicas.stop_all()
    rows = await _rows(
        replicas, "SELECT wa_id, ctwa_clid FROM conversations WHERE superseded_by IS NULL"
    )
    wiped = [phone for phone, clid in rows if clid != _clid(f"R{int(phone[-4:])}")]
    assert len(rows) == PEOPLE
    assert not wiped, f"{len(wiped)} of {PEOPLE} recovered clicks were wiped"


async def test_busy_people_on_three_replicas_are_captured_at_once_and_once(
    tmp_path: Path, pg_url: str
) -> None:
    # 300 notifications of 15 people spread over three replicas at once: captures of one
    # person keep losing races to each other; each must still be processed on its request
    # (none left pending), and only the first click of each person counted and kept.
    three = Replicas(tmp_path, 3, "http://127.0.0.1:9", store_url=pg_url)
    rnd = random.Random(7)
    now = float(int(time.time()))
    try:
        await three.start_all()
        async with aiohttp.ClientSession() as session:

            async def one(k: int) -> Any:
                says = []
                for j in range(rnd.randint(1, 6)):
                    ref = referral(_clid(f"H{k}-{j}")) if rnd.random() < 0.5 else None
                    says.append(message(_phone(rnd.randrange(15)), f"wamid.h{k}-{j}",
                                        ts=now - 300 + k, ref=ref))  # fmt: skip
                hook = three.url(k % 3, WEBHOOK)
                return await _post(session, hook, notification(messages_change(says)))

            answers = await asyncio.gather(*(one(k) for k in range(300)))
    finally:
        await three.stop_all()
    assert [a["archiveStatus"] for a in answers] == ["processed"] * 300
    rows = await _rows(
        three, "SELECT COUNT(*), COUNT(ctwa_clid) FROM conversations WHERE superseded_by IS NULL"
    )
    assert rows == [(15, 15)]
    assert sum(a["clicksCaptured"] for a in answers) == 15
