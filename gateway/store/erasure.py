"""Erasure on request: every row that identifies one person, gone in one transaction.

The person is found by phone (every form WhatsApp may have stored, and numbers they had
before a change), by BSUID (own, parent or former) or by conversation id; then every
conversation that shares one of their identifiers, or was merged into or out of one of
theirs, is theirs too. For those conversations:

- the conversations, their aliases, webhook message ids and automatic events are deleted;
- their events stay (counts and history survive) without the hashed identifiers and click id
  in the stored Meta event, the dry-run payload copies and the request digests;
- deliveries still pending are cancelled (``failed``, ``erased``): never sent after this;
- archived notifications that mention them are rewritten without them (a message, contact or
  status about them becomes ``{"erased": true}``; any other occurrence ``"[erased]"``).

An audit row says who asked, when, and how many rows of each kind went; no identifier. The
database runs with ``secure_delete`` and is checkpointed afterwards, so the bytes are gone
from the file too, not only from the tables.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite
import msgspec

from gateway.store.retention import delete_conversations
from gateway.store.schema import UPDATE_EVENT_STATUS, fetch_rows
from gateway.store.writer import WriteOp
from gateway.wire import ErasureCounts

__all__ = ["Erase", "redact_notification"]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
# user_data keys that identify the person (hashed or not); what stays is the WABA id.
_PERSONAL_USER_DATA = ("em", "ph", "external_id", "ctwa_clid", "fn", "ln", "db", "ge", "ct")
# Keys whose value, when it is one of the person's identifiers, makes the whole object theirs.
_IDENTIFYING_KEYS = frozenset(
    {"from", "wa_id", "recipient_id", "user_id", "from_user_id", "parent_user_id",
     "from_parent_user_id"}
)  # fmt: skip
_ERASED_OBJECT = {"erased": True}
_ERASED = "[erased]"


def redact_notification(body: bytes, identifiers: frozenset[str]) -> bytes | None:
    """Return ``body`` without any trace of ``identifiers``, or None if it held none (or is
    not JSON, which the caller deletes rather than keep unreadable personal data)."""
    try:
        document = _decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return b""
    changed = False

    def walk(value: Any) -> Any:
        nonlocal changed
        if isinstance(value, dict):
            if any(
                key in _IDENTIFYING_KEYS and isinstance(item, str) and item in identifiers
                for key, item in value.items()
            ):
                changed = True
                return dict(_ERASED_OBJECT)
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        if isinstance(value, str) and any(i in value for i in identifiers):
            changed = True
            return _ERASED
        return value

    redacted = walk(document)
    return _encode(redacted) if changed else None


class Erase(WriteOp[ErasureCounts]):
    """Erase one person from one account (see the module's doc); returns the counts."""

    def __init__(
        self,
        *,
        account_id: str,
        phones: Sequence[str] = (),
        bsuids: Sequence[str] = (),
        conversation_ids: Sequence[str] = (),
        actor: str,
        kind: str,
        suppress: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.account_id = account_id
        self.phones, self.bsuids = list(phones), list(bsuids)
        self.conversation_ids = list(conversation_ids)
        self.actor, self.kind = actor, kind
        self.suppress = list(suppress)

    async def apply(self, conn: aiosqlite.Connection) -> ErasureCounts:
        counts = ErasureCounts()
        ids, identifiers = await self._theirs(conn)
        if ids:
            await self._scrub_events(conn, ids, counts)
            deleted = await delete_conversations(conn, ids)
            counts.conversations = deleted["conversations"]
            counts.aliases = deleted["conversation_aliases"]
            counts.webhook_messages = deleted["webhook_messages"]
            counts.automatic_events = deleted["automatic_events"]
        if identifiers:
            counts.notifications_redacted = await self._redact_archive(conn, identifiers)
        now = time.time()
        await conn.execute(
            "INSERT INTO erasures (at, actor, account_id, kind, counts, suppressed)"
            " VALUES (?,?,?,?,?,?)",
            (now, self.actor, self.account_id, self.kind, _encode(counts), bool(self.suppress)),
        )
        await conn.executemany(
            "INSERT OR IGNORE INTO suppressions (account_id, kind, digest, created_at)"
            " VALUES (?,?,?,?)",
            [(self.account_id, kind, digest, now) for kind, digest in self.suppress],
        )
        return counts

    async def _theirs(self, conn: aiosqlite.Connection) -> tuple[list[str], frozenset[str]]:
        """The person's conversations on the account, and every identifier they carry."""
        phones, bsuids = set(self.phones), set(self.bsuids)
        ids: set[str] = set()
        seeds = set(self.conversation_ids)
        for _ in range(8):  # identities chain through merges and changes; a few hops suffice
            found = await self._matching(conn, phones, bsuids, seeds | ids)
            new = found - ids
            if not new:
                break
            ids |= new
            rows = await fetch_rows(
                conn,
                "SELECT wa_id, bsuid, parent_bsuid, superseded_by FROM conversations"
                f" WHERE id IN ({_marks(new)})",
                list(new),
            )
            for wa_id, bsuid, parent, superseded_by in rows:
                phones.update(v for v in (wa_id,) if v)
                bsuids.update(v for v in (bsuid, parent) if v)
                if superseded_by:
                    seeds.add(superseded_by)
            aliases = await fetch_rows(
                conn,
                f"SELECT kind, value FROM conversation_aliases WHERE conversation_id IN"
                f" ({_marks(new)})",
                list(new),
            )
            for kind, value in aliases:
                (phones if kind == "phone" else bsuids).add(value)
        usernames = await fetch_rows(
            conn,
            f"SELECT username FROM conversations WHERE id IN ({_marks(ids)})"
            " AND username IS NOT NULL",
            list(ids),
        ) if ids else []  # fmt: skip
        identifiers = frozenset(phones | bsuids | {row[0] for row in usernames})
        return sorted(ids), identifiers

    async def _matching(
        self,
        conn: aiosqlite.Connection,
        phones: set[str],
        bsuids: set[str],
        ids: set[str],
    ) -> set[str]:
        clauses, params = [], [self.account_id]
        if phones:
            clauses.append(f"wa_id IN ({_marks(phones)})")
            params += sorted(phones)
        if bsuids:
            marks = _marks(bsuids)
            clauses.append(f"bsuid IN ({marks}) OR parent_bsuid IN ({marks})")
            params += sorted(bsuids) * 2
        if ids:
            marks = _marks(ids)
            clauses.append(f"id IN ({marks}) OR superseded_by IN ({marks})")
            params += sorted(ids) * 2
        if not clauses:
            return set()
        found = {
            row[0]
            for row in await fetch_rows(
                conn,
                f"SELECT id FROM conversations WHERE account_id = ? AND ({' OR '.join(clauses)})",
                params,
            )
        }
        values = [*phones, *bsuids]
        if values:
            found |= {
                row[0]
                for row in await fetch_rows(
                    conn,
                    "SELECT conversation_id FROM conversation_aliases WHERE account_id = ?"
                    f" AND value IN ({_marks(values)})",
                    [self.account_id, *values],
                )
            }
        return found

    async def _scrub_events(
        self, conn: aiosqlite.Connection, ids: Sequence[str], counts: ErasureCounts
    ) -> None:
        rows = await fetch_rows(
            conn,
            f"SELECT pk, event FROM events WHERE account_id = ? AND conversation_id IN"
            f" ({_marks(ids)})",
            [self.account_id, *ids],
        )
        scrubbed = []
        for pk, raw in rows:
            event = _decode(raw)
            user_data = event.get("user_data") if isinstance(event, dict) else None
            if isinstance(user_data, dict):
                for key in _PERSONAL_USER_DATA:
                    user_data.pop(key, None)
            scrubbed.append((_encode(event), pk))
        if not scrubbed:
            return
        pks = [pk for _, pk in scrubbed]
        await conn.executemany(
            "UPDATE events SET event = ?, request_fields = NULL WHERE pk = ?", scrubbed
        )
        marks = _marks(pks)
        cursor = await conn.execute(
            "UPDATE deliveries SET status = 'failed', error_code = 'erased',"
            " error = 'cancelled: the person was erased on request; never sent',"
            f" next_attempt_at = NULL WHERE status = 'pending' AND event_pk IN ({marks})",
            pks,
        )
        counts.deliveries_cancelled = cursor.rowcount
        await conn.execute(f"UPDATE deliveries SET payload = NULL WHERE event_pk IN ({marks})", pks)
        await conn.executemany(UPDATE_EVENT_STATUS, [(pk, pk) for pk in pks])
        counts.events_scrubbed = len(pks)

    async def _redact_archive(self, conn: aiosqlite.Connection, identifiers: frozenset[str]) -> int:
        where = " OR ".join("instr(body, ?) > 0" for _ in identifiers)
        rows = await fetch_rows(
            conn,
            f"SELECT pk, body FROM webhook_notifications WHERE {where}",
            [value.encode() for value in sorted(identifiers)],
        )
        changed = 0
        for pk, body in rows:
            redacted = redact_notification(bytes(body), identifiers)
            if redacted is None:
                continue
            if redacted == b"":
                await conn.execute("DELETE FROM webhook_problems WHERE notification_pk = ?", (pk,))
                await conn.execute("DELETE FROM webhook_notifications WHERE pk = ?", (pk,))
            else:
                await conn.execute(
                    "UPDATE webhook_notifications SET body = ? WHERE pk = ?", (redacted, pk)
                )
            changed += 1
        return changed


def _marks(values: Iterable[Any]) -> str:
    return ",".join("?" * len(list(values)))
