"""Click-id capture: a notification's records applied to conversations, in one transaction.

:func:`~gateway.capture.extract.extract` turns the bytes into records and problems;
:class:`CaptureOp` applies them inside one transaction of the group-commit writer, together
with the notification's archive row, so a batch of 1,000 messages is one commit and nothing
is half-written. Who a message is from (phone, BSUID, both) is :mod:`gateway.capture.identities`.

Rules (META.md §3):

- the message id (``wamid``) is the idempotency key: a message seen before changes nothing;
- capture is one-shot: a conversation's ``ctwa_clid`` is never overwritten. A click on a new ad
  after the first click's attribution window has closed starts a new conversation for that
  person (the old one keeps its click and its last inbound time), so a returning customer is
  attributed to the ad that brought them back;
- a referral without ``ctwa_clid`` (WhatsApp Status ads) records the ad, not a click id;
- an ``automatic_events`` entry whose message belongs to a conversation without a click id
  fills it in (the recovery path Zernio documents), and is kept for the history; one that
  comes before its message does so when the message comes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar

import msgspec

from gateway.capture.identities import Alias, Identities
from gateway.capture.payload import Referral
from gateway.capture.records import CaptureBatch, DetectedEvent, InboundMessage, Problem
from gateway.domain import Conversation
from gateway.store.archive import NewNotification, Reprocess, claim, record_new, record_reprocessed
from gateway.store.lookups import EVERYTHING, Touched, tags_of
from gateway.store.rows import (
    CONVERSATION_COLUMNS,
    INSERT_CONVERSATION,
    MUTABLE_CONVERSATION_FIELDS,
    conversation_from_row,
    conversation_params,
)
from gateway.store.sql import Tx
from gateway.store.writer import LostRace, WriteOp

__all__ = ["CaptureOp", "CaptureResult", "ProblemView"]

T = TypeVar("T")
_CHUNK = 400  # under SQLite's bound-variable limit
# Problems listed in the answer; the archive keeps them all.
_MAX_LISTED = 50
_encode = msgspec.json.Encoder().encode
_UPDATE_CONVERSATION = (
    f"UPDATE conversations SET ({', '.join(MUTABLE_CONVERSATION_FIELDS)})"
    f" = ({', '.join('?' * len(MUTABLE_CONVERSATION_FIELDS))}) WHERE id = ?"
)
# Capture reads a person's conversations, decides in memory and writes whole rows back. On
# SQLite the write transaction (BEGIN IMMEDIATE) holds the database from the first read. On
# PostgreSQL, at READ COMMITTED, a plain SELECT locks nothing, and an UPDATE that meets a row
# another replica is updating waits, then applies to the newest version (the docs' "Read
# Committed Isolation Level"): our stale copy would overwrite the other's click, number
# change or recovered click, and a row housekeeping deleted meanwhile would update nothing.
# So before writing, a capture on PostgreSQL locks every row it read, in one statement
# ordered by id (ORDER BY comes before the locking clause: two captures lock in the same
# order), and compares them with what it read. One changed or gone means another transaction
# committed in between: the capture reads and decides again, in the same transaction, with
# those rows now held (a deleted row is not found, and the message starts a new conversation,
# as it would have after the deletion). Raising for PgWriter to run the op again alone, as it
# does for its other lost races, could lose again each time under a busy person (several
# replicas, a few retries: the notification was left pending), and rolled back the whole
# batch. Rows the second reading finds that the first did not are compared in turn; after
# _ROUNDS it gives up (LostRace, which PgWriter does run again alone). Two batches of
# several captures can still deadlock, as their UPDATEs always could; PostgreSQL detects it
# and PgWriter retries.
# Not FOR UPDATE in _live_conversations: its several statements would lock in no common
# order, and a row whose newer version no longer matches (a number just changed) is skipped
# there, not reported. Not an advisory lock on the identifiers a notification names: a
# conversation is also reached by others (a former number's alias, a BSUID it gained). Not
# REPEATABLE READ: it would apply to every op of the writer's batch. A person's first
# conversation, which no row lock covers, is settled by the unique indexes, as before.
_ROUNDS = 4
# The counts a capture's decision makes (the rest of its answer is counted once).
_DECIDED = (
    "identity_changes",
    "clicks_captured",
    "referrals_ignored",
    "referrals_without_click",
    "conversations_created",
    "conversations_merged",
)
_HOLD_AS_READ = (
    f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ANY(?) ORDER BY id FOR UPDATE"
)


class ProblemView(msgspec.Struct, frozen=True, kw_only=True):
    """An unprocessed part, as the webhook's answer lists it."""

    path: str
    code: str
    reason: str


class CaptureResult(msgspec.Struct, kw_only=True, rename="camel"):
    """What capture did; the webhook's answer and its log line."""

    messages: int = 0
    duplicates: int = 0
    conversations_created: int = 0
    conversations_merged: int = 0
    identity_changes: int = 0
    clicks_captured: int = 0
    referrals_ignored: int = 0
    referrals_without_click: int = 0
    automatic_events: int = 0
    clicks_recovered: int = 0
    statuses: int = 0
    unknown_numbers: int = 0
    ignored_changes: int = 0
    # Parts recorded as not processed (listed by `ctwa-gateway webhooks list`).
    unprocessed: int = 0
    problems: list[ProblemView] = msgspec.field(default_factory=list)
    # The archive row (None when the archive is off); "pending": stored, processed later.
    notification_id: int | None = None
    archive_status: str | None = None


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _with_referral(
    conversation: Conversation, referral: Referral, clicked_at: float, now: float
) -> Conversation:
    click = referral.ctwa_clid
    return msgspec.structs.replace(
        conversation,
        ctwa_clid=click,
        ctwa_captured_at=now if click else None,
        ctwa_clicked_at=clicked_at,
        ctwa_source_id=referral.source_id,
        ctwa_source_url=referral.source_url,
        ctwa_headline=referral.headline,
        ctwa_source_type=referral.source_type,
        ctwa_capture_source="message" if click else None,
    )


def _with_problems(result: CaptureResult, problems: Sequence[Problem]) -> CaptureResult:
    """Fill the answer's problem counts and list."""
    result.unprocessed = len(problems)
    result.unknown_numbers = sum(1 for p in problems if p.code == "unknown_number")
    result.problems = [
        ProblemView(path=p.path, code=p.code, reason=p.reason) for p in problems[:_MAX_LISTED]
    ]
    return result


def _touched(identities: Identities, result: CaptureResult) -> Touched:
    """What a capture changed, for the lookup cache: every identifier of every conversation
    it loaded or wrote, before and after, and every alias it added."""
    if identities.released or result.clicks_recovered:
        # A recycled number releases conversations it did not load; a recovered click may
        # make a conversation the best answer for a BSUID it was not loaded by.
        return EVERYTHING
    tags: set[tuple[str, ...]] = set()
    for c in (*identities.loaded.values(), *identities.by_id.values()):
        tags |= tags_of(
            c.account_id,
            conversation_id=c.id,
            phones=[c.wa_id],
            bsuids=[c.bsuid, c.parent_bsuid],
        )
    tags.update((kind, account_id, value) for account_id, kind, value, _, _ in identities.aliases)
    return frozenset(tags)


async def _serialize_messages(tx: Tx, batch: CaptureBatch) -> None:
    """(PostgreSQL) Take a transaction lock per message id the batch names, in one order.

    A message and Meta's automatic event about it may be captured at once on two replicas;
    each links to the other only if it reads what the other wrote (the event reads the
    message's webhook_messages row, the message the event's automatic_events row), and at
    READ COMMITTED each would read before the other committed: the click the event carries
    was lost. No row or unique index covers the pair, so the message id is locked.
    """
    wamids = sorted({m.wamid for m in batch.messages} | {e.wamid for e in batch.automatic})
    if wamids:
        await tx.fetch(
            "SELECT pg_advisory_xact_lock(hashtextextended(w, 0))"
            " FROM unnest(?::text[]) AS w ORDER BY w",
            [wamids],
        )


async def _held_as_read(tx: Tx, loaded: Mapping[str, Conversation]) -> bool:
    """Lock the conversations a capture read until it commits; return whether they are still
    as read (PostgreSQL only: see ``_HOLD_AS_READ``)."""
    if not loaded:
        return True
    rows = await tx.fetch(_HOLD_AS_READ, [sorted(loaded)])
    return {c.id: c for c in map(conversation_from_row, rows)} == loaded


class CaptureOp(WriteOp[CaptureResult]):
    """Apply one notification's records (and archive it) inside the writer's transaction."""

    def __init__(
        self,
        batch: CaptureBatch,
        *,
        window_s: int,
        archive: NewNotification | Reprocess | None = None,
        now: float | None = None,
    ) -> None:
        self.batch = batch
        self.window_s = window_s
        self.archive = archive
        self.now = time.time() if now is None else now
        self._touched: Touched | None = None

    def touched(self) -> Touched | None:
        return self._touched

    async def apply(self, tx: Tx) -> CaptureResult:
        batch = self.batch
        result = _with_problems(
            CaptureResult(statuses=batch.statuses, ignored_changes=batch.ignored_changes),
            batch.problems,
        )
        if isinstance(self.archive, Reprocess) and not await claim(tx, self.archive):
            result.archive_status = "skipped"  # another process reprocessed it meanwhile
            return result
        if tx.engine != "sqlite":
            await _serialize_messages(tx, self.batch)
        fresh = await self._fresh_messages(tx, result)
        for _ in range(_ROUNDS):
            live, aliases = await self._live_conversations(tx, fresh)
            identities, links = self._decide(fresh, live, aliases, result)
            if tx.engine == "sqlite" or await _held_as_read(tx, identities.loaded):
                break
            for field in _DECIDED:
                setattr(result, field, 0)  # counted again by the next decision
        else:
            raise LostRace("the conversations kept changing while capture read them")
        await self._write(tx, identities, links)
        await self._automatic_before(tx, links, result)
        for event in batch.automatic:
            await self._automatic(tx, event, result)
        self._touched = _touched(identities, result)
        if isinstance(self.archive, NewNotification):
            result.notification_id = await record_new(tx, self.archive, batch.problems, self.now)
            result.archive_status = "partial" if batch.problems else "processed"
        elif isinstance(self.archive, Reprocess):
            result.notification_id = self.archive.pk
            result.archive_status = await record_reprocessed(
                tx, self.archive, batch.problems, self.now
            )
        return result

    def _decide(
        self,
        fresh: list[InboundMessage],
        live: list[Conversation],
        aliases: list[Alias],
        result: CaptureResult,
    ) -> tuple[Identities, list[tuple[str, str, str, float]]]:
        """Apply the messages to the conversations read, in memory; count into ``result``."""
        identities = Identities(live, aliases=aliases, now=self.now)
        links: list[tuple[str, str, str, float]] = []
        for message in fresh:
            conversation = identities.conversation_for(message)
            if message.change is not None:
                result.identity_changes += 1
            else:
                if message.referral is not None:
                    conversation = self._refer(conversation, message, identities, result)
                conversation = msgspec.structs.replace(
                    conversation,
                    last_inbound_at=max(conversation.last_inbound_at or 0.0, message.timestamp),
                )
                identities.update(conversation)
            links.append((message.wamid, message.account_id, conversation.id, self.now))
        result.conversations_created = len(identities.created)
        result.conversations_merged = identities.merged
        return identities, links

    async def _write(
        self,
        tx: Tx,
        identities: Identities,
        links: list[tuple[str, str, str, float]],
    ) -> None:
        # At most one live conversation per phone and per BSUID is a unique index, checked
        # row by row: rows that give up or change identifiers step aside first.
        for account_id, phone, taker in identities.released:
            # Every earlier conversation of a recycled number (not only the live one loaded
            # here) stops answering for that phone.
            await tx.execute(
                "UPDATE conversations SET phone_released_at = ? WHERE account_id = ?"
                " AND wa_id = ? AND phone_released_at IS NULL AND id != ?",
                (self.now, account_id, phone, taker),
            )
        rekeyed = identities.rekeyed()
        if rekeyed:
            await tx.executemany(
                "UPDATE conversations SET superseded_by = '~' WHERE id = ?",
                [(cid,) for cid in rekeyed],
            )
        await tx.executemany(
            _UPDATE_CONVERSATION,
            [
                (*(getattr(c, f) for f in MUTABLE_CONVERSATION_FIELDS), c.id)
                for c in identities.changed()
            ],
        )
        await tx.executemany(
            INSERT_CONVERSATION,
            [conversation_params(identities.by_id[cid]) for cid in identities.created],
        )
        if identities.aliases:
            await tx.executemany(
                "INSERT INTO conversation_aliases (account_id, kind, value,"
                " conversation_id, replaced_at) VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                identities.aliases,
            )
        await tx.executemany(
            "INSERT INTO webhook_messages (wamid, account_id, conversation_id, received_at)"
            " VALUES (?,?,?,?)",
            links,
        )

    def _refer(
        self,
        conversation: Conversation,
        message: InboundMessage,
        identities: Identities,
        result: CaptureResult,
    ) -> Conversation:
        referral = message.referral
        assert referral is not None
        if not referral.ctwa_clid:
            result.referrals_without_click += 1
            if conversation.ctwa_clid is None and conversation.ctwa_source_id is None:
                return _with_referral(conversation, referral, message.timestamp, self.now)
            return conversation
        if conversation.ctwa_clid is None:
            result.clicks_captured += 1
            return _with_referral(conversation, referral, message.timestamp, self.now)
        clicked = conversation.click_time() or 0.0
        if (
            referral.ctwa_clid != conversation.ctwa_clid
            and message.timestamp - clicked > self.window_s
        ):
            # The old click can no longer attribute: it stays, untouched, on its conversation;
            # the person's next messages go to a new one with the new click.
            fresh = identities.start(
                conversation.account_id, phone=conversation.wa_id, bsuid=conversation.bsuid
            )
            identities.supersede(conversation, fresh.id)
            fresh = msgspec.structs.replace(
                fresh,
                parent_bsuid=conversation.parent_bsuid,
                username=conversation.username,
                last_inbound_at=message.timestamp,
            )
            result.clicks_captured += 1
            return _with_referral(fresh, referral, message.timestamp, self.now)
        result.referrals_ignored += 1
        return conversation

    async def _fresh_messages(self, tx: Tx, result: CaptureResult) -> list[InboundMessage]:
        wamids = list(dict.fromkeys(m.wamid for m in self.batch.messages))
        seen: set[str] = set()
        for chunk in _chunks(wamids):
            rows = await tx.fetch(
                f"SELECT wamid FROM webhook_messages WHERE wamid IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            seen.update(row[0] for row in rows)
        fresh: list[InboundMessage] = []
        for message in self.batch.messages:
            if message.wamid in seen:
                result.duplicates += 1
                continue
            seen.add(message.wamid)
            fresh.append(message)
        result.messages = len(fresh)
        # Meta does not promise order within a batch; a conversation's history follows time.
        fresh.sort(key=lambda m: m.timestamp)
        return fresh

    async def _live_conversations(
        self, tx: Tx, messages: list[InboundMessage]
    ) -> tuple[list[Conversation], list[Alias]]:
        """Load the live conversations of every identifier the messages mention, current or
        former (the aliases a re-key left), with those aliases."""
        keys: dict[tuple[str, str], list[str]] = defaultdict(list)
        for m in messages:
            phones = [m.phone]
            bsuids = [m.bsuid]
            if m.change is not None:
                phones.append(m.change.new_phone)
                bsuids += [m.change.new_bsuid, m.change.previous_bsuid]
            keys[(m.account_id, "wa_id")].extend(p for p in phones if p)
            keys[(m.account_id, "bsuid")].extend(b for b in bsuids if b)
        found: dict[str, Conversation] = {}
        for (account_id, column), values in keys.items():
            for chunk in _chunks(list(dict.fromkeys(values))):
                rows = await tx.fetch(
                    f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE account_id = ?"
                    f" AND {column} IN ({','.join('?' * len(chunk))})"
                    " AND superseded_by IS NULL",
                    [account_id, *chunk],
                )
                for row in rows:
                    conversation = conversation_from_row(row)
                    found[conversation.id] = conversation
        aliases: list[Alias] = []
        for (account_id, column), values in keys.items():
            kind = "phone" if column == "wa_id" else "bsuid"
            for chunk in _chunks(list(dict.fromkeys(values))):
                aliases += await tx.fetch(
                    "SELECT account_id, kind, value, conversation_id, replaced_at"
                    " FROM conversation_aliases"
                    " WHERE account_id = ? AND kind = ?"
                    f" AND value IN ({','.join('?' * len(chunk))})",
                    [account_id, kind, *chunk],
                )
        # A BSUID a user_changed_user_id names as the previous one may have lost its phone to
        # the new BSUID's first message, come before the change (Identities.restore).
        for m in messages:
            if m.change is not None and m.change.kind == "user_id" and m.change.previous_bsuid:
                rows = await tx.fetch(
                    f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE account_id = ?"
                    " AND bsuid = ? AND superseded_by IS NOT NULL"
                    " AND phone_released_at IS NOT NULL",
                    (m.account_id, m.change.previous_bsuid),
                )
                for row in rows:
                    conversation = conversation_from_row(row)
                    found.setdefault(conversation.id, conversation)
        missing = list({alias[3] for alias in aliases} - found.keys())
        for chunk in _chunks(missing):
            rows = await tx.fetch(
                f"SELECT {CONVERSATION_COLUMNS} FROM conversations"
                f" WHERE id IN ({','.join('?' * len(chunk))}) AND superseded_by IS NULL",
                chunk,
            )
            for row in rows:
                conversation = conversation_from_row(row)
                found[conversation.id] = conversation
        return list(found.values()), [(a, k, v, c, float(at)) for a, k, v, c, at in aliases]

    async def _automatic_before(
        self, tx: Tx, links: list[tuple[str, str, str, float]], result: CaptureResult
    ) -> None:
        """Link the ``automatic_events`` that came before their message (Meta does not
        promise order) to the message's conversation now, their click id filling in one
        without, as when they come after: kept with no conversation, it was lost."""
        by_account: dict[str, dict[str, str]] = defaultdict(dict)
        for wamid, account_id, conversation_id, _ in links:
            by_account[account_id][wamid] = conversation_id
        for account_id, conversations in by_account.items():
            for chunk in _chunks(list(conversations)):
                waiting = await tx.fetch(
                    "SELECT pk, wamid, ctwa_clid FROM automatic_events WHERE account_id = ?"
                    f" AND wamid IN ({','.join('?' * len(chunk))}) AND conversation_id IS NULL",
                    [account_id, *chunk],
                )
                for pk, wamid, clid in waiting:
                    conversation_id = conversations[wamid]
                    await tx.execute(
                        "UPDATE automatic_events SET conversation_id = ? WHERE pk = ?",
                        (conversation_id, pk),
                    )
                    if clid is not None:
                        result.clicks_recovered += await self._recover(tx, clid, conversation_id)

    async def _recover(self, tx: Tx, clid: str, conversation_id: str) -> int:
        """Give a conversation without a click id an automatic event's; 1 if it took it."""
        return await tx.execute(
            "UPDATE conversations SET ctwa_clid = ?, ctwa_captured_at = ?,"
            " ctwa_clicked_at = COALESCE(ctwa_clicked_at, created_at),"
            " ctwa_capture_source = 'automatic_event'"
            " WHERE id = ? AND ctwa_clid IS NULL",
            (clid, self.now, conversation_id),
        )

    async def _automatic(self, tx: Tx, event: DetectedEvent, result: CaptureResult) -> None:
        rows = await tx.fetch(
            "SELECT conversation_id FROM webhook_messages WHERE wamid = ? AND account_id = ?",
            (event.wamid, event.account_id),
        )
        conversation_id = rows[0][0] if rows else None
        inserted = await tx.execute(
            "INSERT INTO automatic_events (account_id, wamid, event_name, ctwa_clid, custom_data,"
            " occurred_at, conversation_id, received_at) VALUES (?,?,?,?,?,?,?,?)"
            " ON CONFLICT (account_id, wamid, event_name) DO NOTHING",
            (
                event.account_id,
                event.wamid,
                event.event_name,
                event.ctwa_clid,
                None if event.custom_data is None else _encode(event.custom_data),
                event.occurred_at,
                conversation_id,
                self.now,
            ),
        )
        if inserted == 0:
            return  # seen before
        result.automatic_events += 1
        if conversation_id is None or event.ctwa_clid is None:
            return
        result.clicks_recovered += await self._recover(tx, event.ctwa_clid, conversation_id)
