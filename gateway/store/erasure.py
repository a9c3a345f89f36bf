"""Erasure on request: every row that identifies one person, gone in one transaction.

The person is found by phone, by BSUID (own, parent or former) or by conversation id; then
every conversation that shares one of their identifiers, or was merged with one of theirs, is
theirs too. A number names whom resolution would take it for (plugins/phone.py): in every form
WhatsApp may have stored it, whoever holds it now; a number someone had before a change only
while nobody holds it, and then only its latest former holder. So a recycled number is never
followed, either way: erasing its new holder spares who had it before, and erasing who had it
spares its new holder (nor are their identifiers suppressed). For those conversations, on that
account only:

- the conversations, their aliases, webhook message ids and automatic events (also those
  that name their message ids or click ids without a conversation) are deleted;
- their events stay (counts and history survive) without the hashed identifiers and click id
  in the stored Meta event, the dry-run payload copies and the request digests;
- deliveries still pending are cancelled (``failed``, ``erased``): never sent after this, and
  neither a batch already in flight nor ``replay`` can bring them back;
- the account's archived notifications are rewritten without them: an object naming one of
  their identifiers exactly under a key that carries one (``from``, ``wa_id``, ``user_id``,
  ``recipient_id``...: a message, contact, status, referral, automatic event) becomes
  ``{"erased": true}``; such a value in a list ``"[erased]"``. Exact values under those keys
  only: an identifier can never rewrite unrelated text, nor a ``"type": "text"``.

An audit row says who asked, when, and how many rows of each kind went; no identifier.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

import msgspec

from gateway.capture.values import MAX_DEPTH, flatten_deep
from gateway.hashing import keyed_digest
from gateway.store.lookups import EVERYTHING, Touched
from gateway.store.retention import delete_conversations, scrub_events
from gateway.store.sql import Tx
from gateway.store.writer import WriteOp
from gateway.wire import ErasureCounts

__all__ = ["Erase", "redact_notification"]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
# The keys that carry a person's identifier in Meta's payloads (messages, contacts, statuses,
# echoes, system messages, automatic events, referrals): one whose value is one of theirs makes
# the whole object theirs. Values under any other key are left alone, whatever they equal.
_IDENTIFYING_KEYS = frozenset(
    {"from", "to", "wa_id", "new_wa_id", "customer", "recipient_id", "user_id",
     "from_user_id", "parent_user_id", "from_parent_user_id", "recipient_user_id",
     "recipient_parent_user_id", "previous_user_id", "previous_parent_user_id", "id",
     "ctwa_clid", "username"}
)  # fmt: skip
_ERASED_OBJECT = {"erased": True}
_ERASED = "[erased]"


def redact_notification(
    body: bytes,
    identifiers: frozenset[str],
    *,
    waba_id: str | None = None,
    phone_number_id: str | None = None,
) -> bytes | None:
    """Return ``body`` without ``identifiers`` in the account's changes, or None if nothing
    changed.

    A change is the account's when its ``metadata.phone_number_id`` is the account's number;
    one without metadata, when its entry is the account's WABA (every change if neither is
    given). The rule capture follows: one WABA may hold several numbers, each another
    account's, and their changes are never touched here. The business's own ``metadata`` is
    never rewritten. A body capture read in parts but that does not decode whole (nested too
    deeply, a number out of range) is read the way capture read it; one that still cannot be
    read, but holds one of the identifiers and the account's number, becomes a tombstone: who
    it names cannot be told apart, and it must not keep them."""
    document = _document(body)
    if document is _UNREADABLE:
        ours = phone_number_id is None or f'"{phone_number_id}"'.encode() in body
        return _TOMBSTONE if ours else None
    changed = False

    def walk(value: Any, key: str | None = None) -> Any:
        nonlocal changed
        if isinstance(value, dict):
            if any(
                name in _IDENTIFYING_KEYS and isinstance(item, str) and item in identifiers
                for name, item in value.items()
            ):
                changed = True
                return dict(_ERASED_OBJECT)
            return {name: item if name == "metadata" else walk(item, name)
                    for name, item in value.items()}  # fmt: skip
        if isinstance(value, list):
            return [walk(item, key) for item in value]  # a list's items are under its key
        if isinstance(value, str) and key in _IDENTIFYING_KEYS and value in identifiers:
            changed = True
            return _ERASED
        return value

    every = waba_id is None and phone_number_id is None
    entries = document.get("entry") if isinstance(document, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        changes = entry.get("changes")
        for change in changes if isinstance(changes, list) else []:
            if not isinstance(change, dict) or not isinstance(change.get("value"), dict):
                continue
            metadata = change["value"].get("metadata")
            number = metadata.get("phone_number_id") if isinstance(metadata, dict) else None
            if number:  # as capture reads it: an empty one is no number
                ours = every or number == phone_number_id
            else:
                ours = every or entry.get("id") == waba_id
            if ours:
                change["value"] = walk(change["value"])
    if not changed:
        return None
    try:
        return _encode_read(document)
    except UnicodeEncodeError:
        # A lone surrogate (a cut emoji) that only the lenient reading took: the body
        # named the person in this account's part, and cannot be written back.
        return _TOMBSTONE


def _document(body: bytes) -> Any:
    """The notification as capture read it, or _UNREADABLE."""
    try:
        return _decode(body)
    except RecursionError:
        body = flatten_deep(body, MAX_DEPTH)  # what capture did: too-deep parts read as null
    except (msgspec.DecodeError, UnicodeDecodeError):
        pass
    try:
        return _decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        pass
    try:
        # Numbers msgspec refuses (1e400, integers past 64 bits) kept exactly as written.
        return json.loads(body, parse_float=Decimal, parse_int=Decimal, parse_constant=_refuse)
    except (ValueError, RecursionError):
        return _UNREADABLE


def _refuse(name: str) -> None:
    raise ValueError(name)  # NaN, Infinity: not JSON


_UNREADABLE = object()
_TOMBSTONE = b'{"erased":true,"reason":"a body that could not be read whole named the person"}'
# Decimals (numbers read as written) are written back as the same numbers.
_encode_read = msgspec.json.Encoder(decimal_format="number").encode


class Erase(WriteOp[tuple[int, ErasureCounts]]):
    """Erase one person from one account (see the module's doc); returns the audit row's id
    and the counts."""

    def __init__(
        self,
        *,
        account_id: str,
        waba_id: str,
        phone_number_id: str,
        phones: Sequence[str] = (),
        bsuids: Sequence[str] = (),
        conversation_ids: Sequence[str] = (),
        actor: str,
        kind: str,
        suppress_key: bytes | None = None,
    ) -> None:
        self.account_id, self.waba_id, self.phone_number_id = account_id, waba_id, phone_number_id
        self.phones, self.bsuids = list(phones), list(bsuids)
        self.conversation_ids = list(conversation_ids)
        self.actor, self.kind = actor, kind
        self.suppress_key = suppress_key

    def touched(self) -> Touched | None:
        return EVERYTHING  # their conversations, found by every identifier they had

    async def apply(self, tx: Tx) -> tuple[int, ErasureCounts]:
        counts = ErasureCounts()
        ids, phones, bsuids = await self._theirs(tx)
        identifiers = set(phones | bsuids)
        if ids:
            identifiers |= await self._traces(tx, ids)
            counts.automatic_events = await self._delete_automatic(tx, identifiers)
            scrubbed, cancelled = await scrub_events(tx, ids, account_id=self.account_id)
            counts.events_scrubbed, counts.deliveries_cancelled = scrubbed, cancelled
            deleted = await delete_conversations(tx, ids)
            counts.conversations = deleted["conversations"]
            counts.aliases = deleted["conversation_aliases"]
            counts.webhook_messages = deleted["webhook_messages"]
            counts.automatic_events += deleted["automatic_events"]
        if identifiers:
            counts.notifications_redacted = await self._redact_archive(tx, frozenset(identifiers))
        now = time.time()
        key = self.suppress_key
        rows = await tx.fetch(
            "INSERT INTO erasures (at, actor, account_id, kind, counts, suppressed)"
            " VALUES (?,?,?,?,?,?) RETURNING pk",
            (now, self.actor, self.account_id, self.kind, _encode(counts), key is not None),
        )
        if key is not None:
            # Every identifier of theirs found, not only the one given: the person must not
            # come back by their BSUID after being erased by phone. Only theirs: a number
            # someone else holds now is not (see _theirs).
            await tx.executemany(
                "INSERT INTO suppressions (account_id, kind, digest, created_at)"
                " VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                [
                    (self.account_id, kind, keyed_digest(key, kind, value), now)
                    for kind, values in (("phone", phones), ("bsuid", bsuids))
                    for value in sorted(values)
                ],
            )
        erasure_id: int = rows[0][0]
        return erasure_id, counts

    async def _theirs(self, tx: Tx) -> tuple[list[str], set[str], set[str]]:
        """The person's conversations on the account, and their phones and BSUIDs."""
        phones, bsuids = set(self.phones), set(self.bsuids)
        ids: set[str] = set()
        seeds = set(self.conversation_ids) | await self._named_by(tx, self.phones)
        former: set[str] = set()
        for _ in range(8):  # identities chain through merges and changes; a few hops suffice
            new = await self._matching(tx, phones, bsuids, seeds | ids) - ids
            if not new:
                break
            ids |= new
            rows = await tx.fetch(
                "SELECT wa_id, bsuid, parent_bsuid, superseded_by, phone_released_at"
                f" FROM conversations WHERE id IN ({_marks(new)})",
                list(new),
            )
            for wa_id, bsuid, parent, superseded_by, released in rows:
                if released is None:
                    # A released number belongs to its new owner, and so does what it
                    # was superseded by: neither is this person.
                    phones.update(v for v in (wa_id,) if v)
                    if superseded_by:
                        seeds.add(superseded_by)
                bsuids.update(v for v in (bsuid, parent) if v)
            aliases = await tx.fetch(
                "SELECT kind, value FROM conversation_aliases WHERE account_id = ?"
                f" AND conversation_id IN ({_marks(new)})",
                [self.account_id, *new],
            )
            for kind, value in aliases:
                (former if kind == "phone" else bsuids).add(value)
        # A number they had before a change is theirs only where it still names them: nobody
        # holds it now and they were its latest holder. Otherwise it is someone else's, whose
        # messages and suppression it must not reach.
        for value in sorted(former - phones):
            if await self._named_by(tx, [value]) & ids:
                phones.add(value)
        return sorted(ids), phones, bsuids

    async def _named_by(self, tx: Tx, forms: Sequence[str]) -> set[str]:
        """The conversations one number (its forms) names, by resolution's rule
        (plugins/phone.py): those that hold it now; only if none does, those of its latest
        former holder. A recycled number never names whoever had it before."""
        if not forms:
            return set()
        values = sorted(set(forms))
        marks = _marks(values)
        rows = await tx.fetch(
            "SELECT id FROM conversations WHERE account_id = ?"
            f" AND wa_id IN ({marks}) AND phone_released_at IS NULL",
            [self.account_id, *values],
        )
        if rows:
            return {row[0] for row in rows}
        rows = await tx.fetch(
            "SELECT a.conversation_id, a.replaced_at FROM conversation_aliases a"
            " JOIN conversations c ON c.id = a.conversation_id"
            f" WHERE a.account_id = ? AND a.kind = 'phone' AND a.value IN ({marks})",
            [self.account_id, *values],
        )
        latest = max((row[1] for row in rows), default=None)
        return {row[0] for row in rows if row[1] == latest}

    async def _matching(
        self, tx: Tx, phones: set[str], bsuids: set[str], ids: set[str]
    ) -> set[str]:
        """Conversations that hold one of ``phones`` now, carry one of ``bsuids`` (own,
        parent or former), or are ``ids`` or were superseded by one of them."""
        clauses, params = [], [self.account_id]
        if phones:
            clauses.append(f"(wa_id IN ({_marks(phones)}) AND phone_released_at IS NULL)")
            params += sorted(phones)
        if bsuids:
            marks = _marks(bsuids)
            clauses.append(f"bsuid IN ({marks}) OR parent_bsuid IN ({marks})")
            params += sorted(bsuids) * 2
        if ids:
            marks = _marks(ids)
            clauses.append(f"id IN ({marks}) OR (superseded_by IN ({marks})")
            clauses[-1] += " AND phone_released_at IS NULL)"
            params += sorted(ids) * 2
        if not clauses:
            return set()
        found = {
            row[0]
            for row in await tx.fetch(
                f"SELECT id FROM conversations WHERE account_id = ? AND ({' OR '.join(clauses)})",
                params,
            )
        }
        if bsuids:
            # Former numbers are not matched here: one names its holder now (_named_by).
            found |= {
                row[0]
                for row in await tx.fetch(
                    "SELECT conversation_id FROM conversation_aliases WHERE account_id = ?"
                    f" AND kind = 'bsuid' AND value IN ({_marks(bsuids)})",
                    [self.account_id, *sorted(bsuids)],
                )
            }
        return found

    async def _traces(self, tx: Tx, ids: Sequence[str]) -> set[str]:
        """Their usernames, click ids and message ids (a wamid carries the phone)."""
        marks = _marks(ids)
        found: set[str] = set()
        for sql in (
            f"SELECT username FROM conversations WHERE id IN ({marks})",
            f"SELECT ctwa_clid FROM conversations WHERE id IN ({marks})",
            f"SELECT wamid FROM webhook_messages WHERE conversation_id IN ({marks})",
            f"SELECT wamid FROM automatic_events WHERE conversation_id IN ({marks})",
            f"SELECT ctwa_clid FROM automatic_events WHERE conversation_id IN ({marks})",
        ):
            found |= {row[0] for row in await tx.fetch(sql, list(ids)) if row[0]}
        return found

    async def _delete_automatic(self, tx: Tx, identifiers: set[str]) -> int:
        """Automatic events that name their message ids or click ids without a conversation."""
        values = sorted(identifiers)
        marks = _marks(values)
        return await tx.execute(
            "DELETE FROM automatic_events WHERE account_id = ? AND conversation_id IS NULL"
            f" AND (wamid IN ({marks}) OR ctwa_clid IN ({marks}))",
            [self.account_id, *values, *values],
        )

    async def _redact_archive(self, tx: Tx, identifiers: frozenset[str]) -> int:
        # A cheap first cut in SQL (bytes that contain an identifier), the exact one in Python.
        contains = "instr(body, ?) > 0" if tx.engine == "sqlite" else "position(? IN body) > 0"
        where = " OR ".join(contains for _ in identifiers)
        rows = await tx.fetch(
            f"SELECT pk, body FROM webhook_notifications WHERE {where}",
            [value.encode() for value in sorted(identifiers)],
        )
        changed = 0
        for pk, body in rows:
            redacted = redact_notification(
                bytes(body),
                identifiers,
                waba_id=self.waba_id,
                phone_number_id=self.phone_number_id,
            )
            if redacted is not None:
                await tx.execute(
                    "UPDATE webhook_notifications SET body = ? WHERE pk = ?", (redacted, pk)
                )
                changed += 1
        return changed


def _marks(values: Iterable[Any]) -> str:
    return ",".join("?" * len(list(values)))
