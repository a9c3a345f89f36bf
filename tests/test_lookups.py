"""Conversation lookups are remembered, and never answer what a write has since changed.

Every conversion looks its conversation up; the store keeps the answers
(:mod:`gateway.store.lookups`). These tests hold it to being exact: after a write in this
process, after a write by another process on the same store (a second ``Store`` on the file,
with its own cache, is what another process has), and after an erasure.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from gateway.store.database import SqliteStore, Store
from gateway.store.lookups import LookupCache
from tests.conftest import AUTH, CLID, ClientFactory, add_conversation, store_of
from tests.payloads import message, messages_change, notification, post_signed, referral

URL = "/v1/whatsapp/conversions"


async def test_a_conversion_right_after_the_click_is_captured_finds_it(
    make_client: ClientFactory,
) -> None:
    """The answer "no conversation" is remembered, and forgotten by the capture that makes
    it wrong: the next conversion finds the click captured a moment earlier."""
    client = await make_client()
    body = {"accountId": "acme", "eventName": "LeadSubmitted", "phoneE164": "+16505559876"}
    resp = await client.post(URL, json={**body, "eventId": "before"}, headers=AUTH)
    assert resp.status == 404, await resp.text()
    lookups = store_of(client).lookups
    hits = lookups.hits
    resp = await client.post(URL, json={**body, "eventId": "before-again"}, headers=AUTH)
    assert resp.status == 404
    assert lookups.hits > hits  # the second one was answered from memory

    await post_signed(
        client,
        notification(messages_change([message("16505559876", "wamid.L1", ref=referral(CLID))])),
    )
    resp = await client.post(URL, json={**body, "eventId": "after"}, headers=AUTH)
    answer = await resp.json()
    assert resp.status == 200, answer
    assert answer["conversationId"].startswith("conv_")


async def test_a_write_by_another_process_is_seen_at_once(db_path: Path) -> None:
    here = await SqliteStore.open(db_path)
    there = await SqliteStore.open(db_path)  # another process: its own writer and its own memory
    try:
        # Remembered here: nobody by this phone, no BSUID, no such id.
        assert await here.conversations_for_phones("acme", ["16505550111"]) == []
        assert await here.latest_conversation_for_bsuid("acme", "US.42") is None
        assert await here.find_conversation("conv_there") is None
        assert await here.conversations_for_phones("acme", ["16505550111"]) == []
        hits = here.lookups.hits
        assert hits > 0

        made = await add_conversation(there, wa_id="16505550111", bsuid="US.42")

        (match,) = await here.conversations_for_phones("acme", ["16505550111"])
        assert match.conversation == made
        assert await here.latest_conversation_for_bsuid("acme", "US.42") == made
        assert await here.find_conversation(made.id) == made
    finally:
        await there.close()
        await here.close()


async def test_an_erasure_elsewhere_forgets_everything_remembered_here(db_path: Path) -> None:
    here = await SqliteStore.open(db_path)
    there = await SqliteStore.open(db_path)
    try:
        made = await add_conversation(here, wa_id="16505550122")
        assert await here.find_conversation(made.id) == made  # remembered
        await there.erase(
            account_id="acme",
            waba_id="102290129340398",
            phone_number_id="106540352242922",
            kind="phone",
            phones=["16505550122"],
            bsuids=[],
            conversation_ids=[],
            actor="test",
            suppress=False,
        )
        assert await here.find_conversation(made.id) is None
        assert await here.conversations_for_phones("acme", ["16505550122"]) == []
    finally:
        await there.close()
        await here.close()


async def test_a_write_in_this_process_forgets_only_what_it_touched(store: Store) -> None:
    first = await add_conversation(store, wa_id="16505550133")
    other = await add_conversation(store, wa_id="16505550144")
    assert await store.find_conversation(first.id) == first
    assert await store.find_conversation(other.id) == other
    # A conversation of a third person: the two answers above stay remembered.
    await add_conversation(store, wa_id="16505550155")
    hits = store.lookups.hits
    assert await store.find_conversation(first.id) == first
    assert await store.find_conversation(other.id) == other
    assert store.lookups.hits == hits + 2


def test_an_answer_is_remembered_for_a_bounded_time() -> None:
    cache = LookupCache(None, ttl_s=0.05)
    cache.put(("id", "conv_1"), "answer", [("id", "conv_1")])
    assert cache.get(("id", "conv_1")) == (True, "answer")
    time.sleep(0.06)
    assert cache.get(("id", "conv_1")) == (False, None)


async def test_the_loop_never_waits_for_another_process_holding_the_write_lock(
    store: Store, db_path: Path
) -> None:
    """A conversion's insert is written on the event loop; when another process holds the
    write lock it goes to the writer's thread, which waits for the lock, not the loop."""
    await add_conversation(store)
    from tests.test_store import new_event

    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing
    insert = asyncio.create_task(store.insert_event(new_event("held")))
    started = time.monotonic()
    await asyncio.sleep(0.2)
    assert time.monotonic() - started < 0.5  # the loop kept turning
    assert not insert.done()  # the insert waits for the lock
    other.execute("COMMIT")
    other.close()
    _, duplicate = await asyncio.wait_for(insert, 5)
    assert not duplicate
    assert await store.find_event("acme", "held") is not None


def test_what_is_remembered_stays_bounded() -> None:
    """Answers dropped through one tag leave their other tags behind; neither map grows
    past its bound however many people come and go."""
    cache = LookupCache(None, max_entries=10)
    for i in range(1000):
        key = ("phones", "acme", f"1650555{i:04d}")
        cache.put(key, [], [("phone", "acme", key[2]), ("id", f"conv_{i}")])
        cache.touched(frozenset({("phone", "acme", key[2])}))  # a capture of that person
    assert len(cache._entries) <= 10
    assert len(cache._by_tag) <= 40
