"""The live conversations a notification touches, by phone and by BSUID per account.

:class:`ConversationIndex` is the bookkeeping the identity rules of
:mod:`gateway.capture.identities` work on: it indexes the live conversations and the
identifiers they had before a re-key (their aliases), and records what changed for
:mod:`gateway.store.capture` to write: conversations created, updated, re-keyed, merged or
superseded, aliases added, numbers released. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from gateway.domain import Conversation, new_conversation_id

__all__ = ["Alias", "ConversationIndex"]

Alias = tuple[str, str, str, str, float]  # account, kind ("phone"/"bsuid"), value, conv id, at


class ConversationIndex:
    """Live conversations by identifier, and what was done to them."""

    def __init__(
        self,
        live: list[Conversation],
        *,
        now: float,
        aliases: Sequence[Alias] = (),
    ) -> None:
        self.now = now
        self.merged = 0
        self.by_id: dict[str, Conversation] = {}
        # The rows as loaded: what capture must update (and, for changed keys, in two steps).
        self.loaded: dict[str, Conversation] = {}
        self.created: list[str] = []
        self.aliases: list[Alias] = []
        # Recycled numbers: (account, phone, the taker's conversation id).
        self.released: list[tuple[str, str, str]] = []
        self._phone: dict[tuple[str, str], str] = {}
        self._bsuid: dict[tuple[str, str], str] = {}
        # Former identifiers of live conversations: (account, kind, value) -> conversation id.
        self._former: dict[tuple[str, str, str], str] = {}
        # When each was last known to be the conversation's (the time the message that
        # replaced it, or named it as a former one, was sent): a number left before a change
        # to it was someone else's, recycled since.
        self._former_at: dict[tuple[str, str, str], float] = {}
        # The time the message being applied was sent (not received: Meta retries for days).
        self._sent = now
        for conversation in live:
            self.loaded[conversation.id] = conversation
            self._put(conversation)
        for account_id, kind, value, conversation_id, at in aliases:
            if conversation_id in self.by_id:
                self._former[(account_id, kind, value)] = conversation_id
                self._former_at[(account_id, kind, value)] = at

    # -- the index ------------------------------------------------------------------------

    def _keys(self, c: Conversation) -> list[tuple[dict[tuple[str, str], str], tuple[str, str]]]:
        keys = []
        if c.wa_id is not None:
            keys.append((self._phone, (c.account_id, c.wa_id)))
        if c.bsuid is not None:
            keys.append((self._bsuid, (c.account_id, c.bsuid)))
        return keys

    def _put(self, c: Conversation) -> Conversation:
        """Store the new state of ``c`` and re-index its identifiers."""
        old = self.by_id.get(c.id)
        if old is not None:
            for index, key in self._keys(old):
                if index.get(key) == c.id:
                    del index[key]
        self.by_id[c.id] = c
        if c.superseded_by is None:
            for index, key in self._keys(c):
                index[key] = c.id
        return c

    def _live(
        self, account_id: str, *, phone: str | None = None, bsuid: str | None = None
    ) -> Conversation | None:
        if bsuid is not None:
            found = self._bsuid.get((account_id, bsuid))
        elif phone is not None:
            found = self._phone.get((account_id, phone))
        else:
            return None
        return None if found is None else self.by_id[found]

    def _formerly(
        self, account_id: str, *, phone: str | None = None, bsuid: str | None = None
    ) -> Conversation | None:
        """Return the live conversation that had this identifier before a re-key."""
        kind, value = ("bsuid", bsuid) if bsuid is not None else ("phone", phone)
        found = self._former.get((account_id, kind, value or ""))
        c = None if found is None else self.by_id[found]
        return c if c is not None and c.superseded_by is None else None

    def changed(self) -> list[Conversation]:
        """Return the loaded conversations whose rows changed."""
        return [c for cid, c in self.by_id.items() if cid in self.loaded and c != self.loaded[cid]]

    def rekeyed(self) -> list[str]:
        """Return loaded conversations that end superseded or with other identifiers."""
        out = []
        for c in self.changed():
            before = self.loaded[c.id]
            if c.superseded_by is not None or (c.wa_id, c.bsuid) != (before.wa_id, before.bsuid):
                out.append(c.id)
        return out

    # -- changes --------------------------------------------------------------------------

    def start(self, account_id: str, *, phone: str | None, bsuid: str | None) -> Conversation:
        """Return a new live conversation for these identifiers."""
        conversation = Conversation(
            id=new_conversation_id(),
            account_id=account_id,
            created_at=self.now,
            wa_id=phone,
            bsuid=bsuid,
        )
        self.created.append(conversation.id)
        return self._put(conversation)

    def supersede(self, old: Conversation, by: str) -> None:
        """Retire ``old``: ``by`` takes its identifiers over."""
        self._put(msgspec.structs.replace(old, superseded_by=by))

    def update(self, c: Conversation) -> Conversation:
        """Store a changed conversation (capture's click and time updates)."""
        return self._put(c)

    def _merge(self, preferred: Conversation, other: Conversation) -> Conversation:
        """Merge two live conversations of one person; return the survivor."""
        survivor, loser = preferred, other
        has, other_has = preferred.ctwa_clid is not None, other.ctwa_clid is not None
        if other_has and (not has or (other.click_time() or 0.0) > (preferred.click_time() or 0.0)):
            survivor, loser = other, preferred
        self.supersede(loser, survivor.id)
        self.merged += 1
        if survivor.ctwa_clid is None and survivor.ctwa_source_id is None:
            # Neither has a click: keep the ad the other recorded (a WhatsApp Status ad).
            survivor = msgspec.structs.replace(
                survivor,
                ctwa_clicked_at=loser.ctwa_clicked_at,
                ctwa_source_id=loser.ctwa_source_id,
                ctwa_source_url=loser.ctwa_source_url,
                ctwa_headline=loser.ctwa_headline,
                ctwa_source_type=loser.ctwa_source_type,
            )
        latest = max(survivor.last_inbound_at or 0.0, loser.last_inbound_at or 0.0) or None
        return self._put(
            msgspec.structs.replace(
                survivor,
                wa_id=survivor.wa_id or loser.wa_id,
                bsuid=survivor.bsuid or loser.bsuid,
                parent_bsuid=survivor.parent_bsuid or loser.parent_bsuid,
                username=survivor.username or loser.username,
                last_inbound_at=latest,
            )
        )

    def _one(self, found: list[Conversation | None]) -> Conversation | None:
        """Merge the distinct live conversations found (first preferred) into one."""
        result: Conversation | None = None
        for c in found:
            if c is None:
                continue
            current = self.by_id[c.id]
            if current.superseded_by is not None:
                continue  # merged away by an earlier step of this message
            if result is None:
                result = current
            elif current.id != result.id:
                result = self._merge(result, current)
        return result

    def _rekey(self, c: Conversation, *, phone: str | None, bsuid: str | None) -> Conversation:
        """Give ``c`` these identifiers; the ones replaced become aliases."""
        if phone is not None and c.wa_id is not None and c.wa_id != phone:
            self._alias(c, "phone", c.wa_id)
        if bsuid is not None and c.bsuid is not None and c.bsuid != bsuid:
            self._alias(c, "bsuid", c.bsuid)
        return msgspec.structs.replace(c, wa_id=phone or c.wa_id, bsuid=bsuid or c.bsuid)

    def _alias(self, c: Conversation, kind: str, value: str | None) -> None:
        if value is not None:
            self.aliases.append((c.account_id, kind, value, c.id, self._sent))
            self._former[(c.account_id, kind, value)] = c.id
            self._former_at[(c.account_id, kind, value)] = self._sent

    def _release(self, holder: Conversation, taker: Conversation) -> None:
        """A recycled number: ``holder``'s phone now belongs to ``taker``'s person."""
        released = msgspec.structs.replace(holder, phone_released_at=self.now)
        self.released.append((holder.account_id, holder.wa_id or "", taker.id))
        self.supersede(released, taker.id)
