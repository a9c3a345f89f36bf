"""Click-id capture: from a verified webhook notification to stored conversations.

:func:`extract` turns Meta's envelope into plain records (which account, which phone, which
message, which referral); :class:`CaptureOp` applies a whole notification in one transaction of
the group-commit writer, so a batch of 1,000 messages is one commit and nothing is half-written.

Rules (META.md §3):

- the message id (``wamid``) is the idempotency key: a message seen before changes nothing;
- capture is one-shot: a conversation's ``ctwa_clid`` is never overwritten. A click on a new ad
  after the first click's attribution window has closed starts a new conversation for that
  phone (the old one keeps its click), so a returning customer is attributed to the ad that
  brought them back;
- a referral without ``ctwa_clid`` (WhatsApp Status ads) records the ad, not a click id;
- an ``automatic_events`` entry whose message belongs to a conversation without a click id
  fills it in (the recovery path Zernio documents), and is kept for the history.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TypeVar

import aiosqlite
import msgspec

from gateway.config import Settings
from gateway.domain import Conversation
from gateway.errors import InvalidRequest
from gateway.schema import (
    CONVERSATION_COLUMNS,
    INSERT_CONVERSATION,
    MUTABLE_CONVERSATION_FIELDS,
    conversation_from_row,
    conversation_params,
    fetch_rows,
    new_conversation_id,
)
from gateway.webhook_models import (
    AUTOMATIC_EVENTS_DECODER,
    MESSAGES_DECODER,
    AutomaticEventsValue,
    Envelope,
    MessagesValue,
    Metadata,
    Referral,
)
from gateway.writer import WriteOp

__all__ = ["CaptureBatch", "CaptureOp", "CaptureResult", "extract"]

T = TypeVar("T")
_CHUNK = 400  # under SQLite's bound-variable limit
_MAX_TEXT = 2048  # ad texts and URLs are Meta's; bound what one row can hold
_encode = msgspec.json.Encoder().encode


class InboundMessage(msgspec.Struct, frozen=True, kw_only=True):
    account_id: str
    wa_id: str
    wamid: str
    timestamp: float
    referral: Referral | None


class DetectedEvent(msgspec.Struct, frozen=True, kw_only=True):
    account_id: str
    wamid: str
    event_name: str
    ctwa_clid: str | None
    custom_data: dict[str, object] | None
    occurred_at: float | None


class CaptureBatch(msgspec.Struct, kw_only=True):
    """What one notification carries, by account."""

    messages: list[InboundMessage] = msgspec.field(default_factory=list)
    automatic: list[DetectedEvent] = msgspec.field(default_factory=list)
    unknown_numbers: list[str] = msgspec.field(default_factory=list)
    statuses: int = 0
    ignored_changes: int = 0


class CaptureResult(msgspec.Struct, kw_only=True, rename="camel"):
    """What capture did; the webhook's answer and its log line."""

    messages: int = 0
    duplicates: int = 0
    conversations_created: int = 0
    clicks_captured: int = 0
    referrals_ignored: int = 0
    referrals_without_click: int = 0
    automatic_events: int = 0
    clicks_recovered: int = 0
    statuses: int = 0
    unknown_numbers: int = 0
    ignored_changes: int = 0


def _decode(raw: msgspec.Raw, decoder: msgspec.json.Decoder[T], path: str) -> T:
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        text = str(exc).replace("`$", f"`$.{path}", 1)
        if " - at `" not in text:
            text += f" - at `$.{path}`"
        raise InvalidRequest(
            f"Malformed notification: {text}", code="invalid_notification"
        ) from None


def _seconds(value: object, path: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return float(value)
    raise InvalidRequest(
        f"Malformed notification: `$.{path}` is not a Unix timestamp.",
        code="invalid_notification",
    )


def extract(envelope: Envelope, settings: Settings) -> CaptureBatch:
    """Return the records in ``envelope``; raise InvalidRequest naming a malformed path."""
    batch = CaptureBatch()
    for i, entry in enumerate(envelope.entry):
        for j, change in enumerate(entry.changes):
            path = f"entry[{i}].changes[{j}].value"
            if change.field == "messages":
                messages = _decode(change.value, MESSAGES_DECODER, path)
                account_id = _account(batch, settings, messages.metadata, entry.id)
                if account_id is not None:
                    _messages(batch, messages, account_id, path)
            elif change.field == "automatic_events":
                detected = _decode(change.value, AUTOMATIC_EVENTS_DECODER, path)
                account_id = _account(batch, settings, detected.metadata, entry.id)
                if account_id is not None:
                    _automatic(batch, detected, account_id, path)
            else:
                batch.ignored_changes += 1
    return batch


def _account(
    batch: CaptureBatch, settings: Settings, metadata: Metadata | None, waba_id: str
) -> str | None:
    number = metadata.phone_number_id if metadata else None
    account = settings.account_for_number(number, waba_id)
    if account is None:
        batch.unknown_numbers.append(number or waba_id)
        return None
    return account.id


def _messages(batch: CaptureBatch, value: MessagesValue, account_id: str, path: str) -> None:
    batch.statuses += len(value.statuses)
    for k, message in enumerate(value.messages):
        where = f"{path}.messages[{k}]"
        wa_id = message.from_
        if not (wa_id.isascii() and wa_id.isdigit() and 6 <= len(wa_id) <= 20):
            raise InvalidRequest(
                f"Malformed notification: `$.{where}.from` is not a WhatsApp id.",
                code="invalid_notification",
            )
        batch.messages.append(
            InboundMessage(
                account_id=account_id,
                wa_id=wa_id,
                wamid=message.id,
                timestamp=_seconds(message.timestamp, f"{where}.timestamp"),
                referral=message.referral,
            )
        )


def _automatic(
    batch: CaptureBatch, value: AutomaticEventsValue, account_id: str, path: str
) -> None:
    for k, event in enumerate(value.automatic_events):
        where = f"{path}.automatic_events[{k}].timestamp"
        batch.automatic.append(
            DetectedEvent(
                account_id=account_id,
                wamid=event.id,
                event_name=event.event_name,
                ctwa_clid=event.ctwa_clid or None,
                custom_data=event.custom_data,
                occurred_at=None if event.timestamp is None else _seconds(event.timestamp, where),
            )
        )


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _text(value: str | None) -> str | None:
    return None if value is None else value[:_MAX_TEXT]


def _with_referral(
    conversation: Conversation, referral: Referral, clicked_at: float, now: float
) -> Conversation:
    click = referral.ctwa_clid or None
    return msgspec.structs.replace(
        conversation,
        ctwa_clid=click,
        ctwa_captured_at=now if click else None,
        ctwa_clicked_at=clicked_at,
        ctwa_source_id=_text(referral.source_id),
        ctwa_source_url=_text(referral.source_url),
        ctwa_headline=_text(referral.headline),
        ctwa_source_type=_text(referral.source_type),
        ctwa_capture_source="message" if click else None,
    )


class CaptureOp(WriteOp[CaptureResult]):
    """Apply one notification's records inside the writer's transaction."""

    def __init__(self, batch: CaptureBatch, *, window_s: int, now: float | None = None) -> None:
        self.batch = batch
        self.window_s = window_s
        self.now = time.time() if now is None else now

    async def apply(self, conn: aiosqlite.Connection) -> CaptureResult:
        batch = self.batch
        result = CaptureResult(
            statuses=batch.statuses,
            unknown_numbers=len(batch.unknown_numbers),
            ignored_changes=batch.ignored_changes,
        )
        fresh = await self._fresh_messages(conn, result)
        current = await self._current_conversations(conn, fresh)
        created: dict[str, Conversation] = {}
        updated: dict[str, Conversation] = {}
        links: list[tuple[str, str, str, float]] = []
        for message in fresh:
            key = (message.account_id, message.wa_id)
            conversation = current.get(key)
            if conversation is None:
                conversation = Conversation(
                    id=new_conversation_id(),
                    account_id=message.account_id,
                    wa_id=message.wa_id,
                    created_at=self.now,
                )
                created[conversation.id] = conversation
                result.conversations_created += 1
            conversation = msgspec.structs.replace(
                conversation,
                last_inbound_at=max(conversation.last_inbound_at or 0.0, message.timestamp),
            )
            if message.referral is not None:
                conversation = self._refer(conversation, message, created, updated, result)
            current[key] = conversation
            (created if conversation.id in created else updated)[conversation.id] = conversation
            links.append((message.wamid, message.account_id, conversation.id, self.now))
        await conn.executemany(
            INSERT_CONVERSATION, [conversation_params(c) for c in created.values()]
        )
        await conn.executemany(
            f"UPDATE conversations SET ({', '.join(MUTABLE_CONVERSATION_FIELDS)})"
            f" = ({', '.join('?' * len(MUTABLE_CONVERSATION_FIELDS))}) WHERE id = ?",
            [
                (*(getattr(c, f) for f in MUTABLE_CONVERSATION_FIELDS), c.id)
                for c in updated.values()
            ],
        )
        await conn.executemany(
            "INSERT INTO webhook_messages (wamid, account_id, conversation_id, received_at)"
            " VALUES (?,?,?,?)",
            links,
        )
        for event in batch.automatic:
            await self._automatic(conn, event, result)
        return result

    def _refer(
        self,
        conversation: Conversation,
        message: InboundMessage,
        created: dict[str, Conversation],
        updated: dict[str, Conversation],
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
            # The old click can no longer attribute: keep it on its conversation, start anew.
            (created if conversation.id in created else updated)[conversation.id] = conversation
            fresh = Conversation(
                id=new_conversation_id(),
                account_id=conversation.account_id,
                wa_id=conversation.wa_id,
                created_at=self.now,
                last_inbound_at=message.timestamp,
            )
            created[fresh.id] = fresh
            result.conversations_created += 1
            result.clicks_captured += 1
            return _with_referral(fresh, referral, message.timestamp, self.now)
        result.referrals_ignored += 1
        return conversation

    async def _fresh_messages(
        self, conn: aiosqlite.Connection, result: CaptureResult
    ) -> list[InboundMessage]:
        wamids = list(dict.fromkeys(m.wamid for m in self.batch.messages))
        seen: set[str] = set()
        for chunk in _chunks(wamids):
            rows = await fetch_rows(
                conn,
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

    async def _current_conversations(
        self, conn: aiosqlite.Connection, messages: list[InboundMessage]
    ) -> dict[tuple[str, str], Conversation]:
        phones: dict[str, list[str]] = defaultdict(list)
        for account_id, wa_id in dict.fromkeys((m.account_id, m.wa_id) for m in messages):
            phones[account_id].append(wa_id)
        current: dict[tuple[str, str], Conversation] = {}
        for account_id, wa_ids in phones.items():
            for chunk in _chunks(wa_ids):
                rows = await fetch_rows(
                    conn,
                    f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE account_id = ?"
                    f" AND wa_id IN ({','.join('?' * len(chunk))}) ORDER BY created_at, rowid",
                    [account_id, *chunk],
                )
                # Ordered oldest first, so each phone ends with its newest conversation.
                for row in rows:
                    conversation = conversation_from_row(row)
                    current[(account_id, conversation.wa_id)] = conversation
        return current

    async def _automatic(
        self, conn: aiosqlite.Connection, event: DetectedEvent, result: CaptureResult
    ) -> None:
        rows = await fetch_rows(
            conn,
            "SELECT conversation_id FROM webhook_messages WHERE wamid = ? AND account_id = ?",
            (event.wamid, event.account_id),
        )
        conversation_id = rows[0][0] if rows else None
        cursor = await conn.execute(
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
        if cursor.rowcount == 0:
            return  # seen before
        result.automatic_events += 1
        if conversation_id is None or event.ctwa_clid is None:
            return
        cursor = await conn.execute(
            "UPDATE conversations SET ctwa_clid = ?, ctwa_captured_at = ?,"
            " ctwa_clicked_at = COALESCE(ctwa_clicked_at, created_at),"
            " ctwa_capture_source = 'automatic_event'"
            " WHERE id = ? AND ctwa_clid IS NULL",
            (event.ctwa_clid, self.now, conversation_id),
        )
        result.clicks_recovered += cursor.rowcount
