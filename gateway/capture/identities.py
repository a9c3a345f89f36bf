"""Which conversation a message belongs to, when a person is a phone, a BSUID, or both.

:class:`Identities` applies the rules below in memory to the live conversations a notification
touches, kept by :class:`~gateway.capture.conversation_index.ConversationIndex` (by phone and
by BSUID per account); :mod:`gateway.store.capture` loads it and writes what changed. Pure: no
I/O.

Rules (README, "Who is who"):

- A message goes to the live conversation of its BSUID, else of its phone, else a new one; it
  fills in the half the conversation lacked (the phone once Meta shares it, the BSUID once
  the user has one) and the latest username.
- If the BSUID and the phone each lead to a different live conversation, they are one person:
  the two are merged. The survivor is the one with a click id; if both have one, the one
  clicked last; if neither, the BSUID's. The other is kept (with its click and its events)
  but superseded: it never receives messages again.
- A phone whose live conversation has another BSUID and no message from this BSUID yet is a
  recycled number: the new BSUID starts a conversation of its own, which takes the phone over.
  Not if that conversation had this BSUID before a change, nor, for a ``user_changed_number``
  naming no new BSUID, if it was written to after the change (the person's new BSUID). A
  message sent before that conversation last wrote or changed is the number's previous
  owner's, delivered late: the phone stays with its holder, an alias of the sender's. So is
  a message with a BSUID sent before a conversation keyed by its number alone changed onto
  it (someone else moved onto the number the sender left): it goes to the conversation that
  had its BSUID before a change, else starts one.
- ``user_changed_number`` and ``user_changed_user_id`` re-key the conversation to the new
  identifier, keeping its click and its history; the old identifier is kept as an alias so a
  conversion sent with it still finds the conversation. Arriving before any other message of
  that user, they start a conversation under the new identifiers, the old ones its aliases. A
  message sent before the last change and delivered after it (Meta retries for days) joins
  the conversation without re-keying it: what it names becomes an alias. A user_changed_user_id
  that explains a recycled number (the new BSUID wrote first) undoes it: the two are merged.
  A change does not join the conversation of the number it was sent from when that one is
  another BSUID's and wrote or changed after the change was sent: the sender had left it (a
  ``user_changed_user_id`` leaves that one the number, an alias of the sender's). Nor, when
  the change names the BSUID it was sent under (``previous_user_id``, or in Meta's older
  shape a sender other than the new BSUID it names), when that one is another BSUID's at
  all: a recycled number whose holder's move off it is still to come (a
  ``user_changed_user_id`` takes the number over, as a message does).
  Nor does a change join (or take) a number's conversation keyed by it alone that changed
  onto it after the change was sent: someone else moved onto the number the person left (a
  person first known by that change starts a conversation keyed by a BSUID it names).
  A change older than one already applied never takes its new number from another BSUID's
  conversation as a recycled number: the person has left that number since; nor does a
  ``user_changed_number`` naming the new BSUID when another BSUID wrote from the number
  after it was sent (that change still to come). A
  ``user_changed_number`` onto a number whose conversation is keyed by it alone and neither
  wrote nor changed after the change was sent takes it as a recycled number: the person was
  not on it before (that is its previous owner, who left it unseen).
- A number a conversation left finds it again (a later change or a late message, by that
  number alone) only if it left the number after what is applied now was sent: a number left
  before was someone else's, recycled since. Nor, for a change from that number, when the
  conversation has another BSUID than the change names: someone else had the number after
  the change was sent (recycled) and moved off it since; nor when a BSUID the change names
  finds a conversation as a former one (that one is the person's).
"""

from __future__ import annotations

import msgspec

from gateway.capture.conversation_index import Alias, ConversationIndex
from gateway.capture.records import InboundMessage
from gateway.domain import Conversation

__all__ = ["Alias", "Identities"]


class Identities(ConversationIndex):
    """What a batch of messages does to the live conversations, by the rules above."""

    def _another_person(self, holder: Conversation, *bsuids: str | None) -> bool:
        """Is ``holder`` (found by phone) someone else than the BSUIDs of this person? Not if
        one of them is a BSUID ``holder`` had before a change (its changes came first)."""
        if holder.bsuid is None or not any(bsuids) or holder.bsuid in bsuids:
            return False
        return all(
            self._former.get((holder.account_id, "bsuid", b)) != holder.id for b in bsuids if b
        )

    def _moved_on(self, holder: Conversation, m: InboundMessage, *bsuids: str | None) -> bool:
        """Did ``holder`` of a number change onto it after ``m`` was sent, as someone else?

        Keyed by the number alone (no BSUID since its change, README), with none of
        ``bsuids`` among its former ones: this person's own later change would have left the
        number (one moving back onto a number it had is not told apart)."""
        return (
            holder.bsuid is None
            and (holder.keys_changed_at or 0.0) > m.timestamp
            and all(
                self._former.get((holder.account_id, "bsuid", b)) != holder.id for b in bsuids if b
            )
        )

    def _wrote_since(self, holder: Conversation, m: InboundMessage, *bsuids: str | None) -> bool:
        """Did ``holder`` of the new number ``m`` names write from it after ``m`` was sent,
        under another BSUID than the new one ``m`` names? The number was the person's then:
        they have left it since and it was recycled (not when ``m`` names no new BSUID: the
        holder may be the person's new one, :meth:`_moved_in`)."""
        change = m.change
        assert change is not None
        return (
            change.new_bsuid is not None
            and (holder.last_inbound_at or 0.0) > m.timestamp
            and self._another_person(holder, *bsuids)
        )

    def _left_alone(self, holder: Conversation, m: InboundMessage, *bsuids: str | None) -> bool:
        """Is ``holder`` of the new number ``m`` moves onto, keyed by that number alone, its
        previous owner? It neither wrote nor changed after the move was sent, and had none
        of ``bsuids`` before a change: the person was not on the number before the move (one
        moving back onto a number it had is not told apart)."""
        return (
            holder.bsuid is None
            and not self._active_after(holder, m.timestamp)
            and all(
                self._former.get((holder.account_id, "bsuid", b)) != holder.id for b in bsuids if b
            )
        )

    @staticmethod
    def _active_after(c: Conversation, at: float) -> bool:
        """Did ``c`` write or change after ``at`` (sent times)?"""
        return max(c.last_inbound_at or 0.0, c.keys_changed_at or 0.0) > at

    def conversation_for(self, m: InboundMessage) -> Conversation:
        """Return the live conversation ``m`` belongs to, creating or merging as the rules say."""
        self._sent = m.timestamp
        if m.change is not None:
            return self._changed_identity(m)
        account = m.account_id
        by_bsuid = self._live(account, bsuid=m.bsuid)
        by_phone = self._live(account, phone=m.phone)
        if (
            by_phone is not None
            and m.bsuid is not None
            and by_bsuid is None
            and self._moved_on(by_phone, m, m.bsuid)
        ):
            # The holder changed onto the number after this was sent, keyed by it alone
            # (README): the sender is the number's previous owner, delivered late. Their
            # conversation (by a BSUID they had since changed, if any) gets it.
            mine = self._formerly(account, bsuid=m.bsuid)
            if mine is not None and m.timestamp <= (mine.keys_changed_at or 0.0):
                return self._before_change(mine, m)
            mine = self.start(account, phone=None, bsuid=m.bsuid)
            self._alias(mine, "phone", m.phone)
            return self._put(self._with_profile(self.by_id[mine.id], m))
        if by_phone is not None and self._another_person(by_phone, m.bsuid):
            if self._active_after(by_phone, m.timestamp):
                # Sent before the holder wrote: from the number's previous owner, delivered
                # late (Meta retries for days). Theirs then, an alias; the holder keeps it.
                mine = by_bsuid or self.start(account, phone=None, bsuid=m.bsuid)
                self._alias(mine, "phone", m.phone)
                return self._put(self._with_profile(self.by_id[mine.id], m))
            taker = by_bsuid or self.start(account, phone=None, bsuid=m.bsuid)
            self._release(by_phone, taker)
            by_bsuid, by_phone = self.by_id[taker.id], None
        conversation = self._one([by_bsuid, by_phone])
        if conversation is None:
            # By the number only for a message without a BSUID: a number is recycled, and one
            # sent with a BSUID by the person who left the number finds them by that BSUID.
            former = self._formerly(account, bsuid=m.bsuid) or (
                self._left_after(account, m.phone, m.timestamp) if m.bsuid is None else None
            )
            if former is not None and m.timestamp <= (former.keys_changed_at or 0.0):
                # Sent under an identifier the person has since changed: theirs, un-re-keyed.
                return self._before_change(former, m)
            conversation = self.start(account, phone=m.phone, bsuid=m.bsuid)
        if m.timestamp < (conversation.keys_changed_at or 0.0):
            return self._before_change(conversation, m)
        conversation = self._rekey(conversation, phone=m.phone, bsuid=m.bsuid)
        former = self._formerly(account, phone=m.phone)
        if former is not None and former.id != conversation.id and m.phone is not None:
            # The number someone left after a change now writes as someone else: a recycled
            # number. That person's older conversations stop answering for it.
            self.released.append((account, m.phone, conversation.id))
        return self._put(self._with_profile(conversation, m))

    def _before_change(self, c: Conversation, m: InboundMessage) -> Conversation:
        """Add a message sent before the person's last change and delivered after it (Meta
        retries for days): what it names is theirs from before, an alias; the change's
        identifiers stay the keys."""
        self._alias(c, "phone", m.phone if m.phone != c.wa_id else None)
        self._alias(c, "bsuid", m.bsuid if m.bsuid != c.bsuid else None)
        return self._put(self._with_profile(c, m))

    def _changed_identity(self, m: InboundMessage) -> Conversation:
        change = m.change
        assert change is not None
        account = m.account_id
        sent_from = self._live(account, phone=m.phone)
        named = (m.bsuid, change.previous_bsuid, change.new_bsuid)
        if sent_from is not None and (
            self._moved_on(sent_from, m, *named)
            or (
                self._active_after(sent_from, m.timestamp)
                and self._another_person(sent_from, *named)
            )
        ):
            # Someone else had the number it was sent from after it was sent: the sender
            # had left it, and this change was delivered late (Meta retries for days).
            sent_from = None
        recycled = None
        # The BSUID it was sent under, when known: the previous one, or (Meta's older shape)
        # the sender's when the change names another as the new one.
        previous = change.previous_bsuid or (
            m.bsuid if change.new_bsuid not in (None, m.bsuid) else None
        )
        if (
            sent_from is not None
            and previous is not None
            and self._another_person(sent_from, *named)
        ):
            # Another BSUID's, last seen before this change was sent under the one it names:
            # a recycled number, as for a message (the holder's move off it still to come).
            recycled, sent_from = sent_from, None
        own = (
            self._one(
                [
                    self._live(account, bsuid=change.previous_bsuid),
                    self._live(account, bsuid=m.bsuid),
                    self._live(account, bsuid=change.new_bsuid),
                    sent_from,
                ]
            )
            or self._one(
                [
                    self._formerly(account, bsuid=change.previous_bsuid),
                    self._formerly(account, bsuid=m.bsuid),
                ]
            )
            # By the number it was sent from only when no BSUID it names finds anyone: a
            # conversation keyed by a number alone cannot be told apart from the number's
            # next owner's (the two were merged), a former BSUID can.
            or self._left_after(account, m.phone, m.timestamp, *named)
        )
        if change.kind == "user_id" and own is not None and change.previous_bsuid:
            own = self._restore(own, change.previous_bsuid)
        own = self._with_later(own, m)
        # The BSUID it was sent under, unless the change names that as the previous one.
        sender = m.bsuid if m.bsuid != change.previous_bsuid else None
        if change.kind == "number":
            new_phone = change.new_phone
            holder = self._live(account, phone=new_phone)
            if holder is not None and (own is None or holder.id != own.id):
                mine = (
                    m.bsuid,
                    change.new_bsuid,
                    change.previous_bsuid,
                    own.bsuid if own else None,
                )
                key = change.new_bsuid or sender or change.previous_bsuid
                if (self._moved_on(holder, m, *mine) or self._wrote_since(holder, m, *mine)) and (
                    own is not None or key is not None
                ):
                    # Someone else changed onto the number after this change was sent, or
                    # wrote from it under another BSUID than the new one it names: the
                    # person has left it since (that change still to come). Theirs then; a
                    # person first known by this change is keyed by a BSUID it names.
                    if own is None:
                        own = self.start(account, phone=None, bsuid=key)
                        own = self._put(msgspec.structs.replace(own, keys_changed_at=m.timestamp))
                        previous = change.previous_bsuid
                        self._alias(own, "bsuid", previous if previous != key else None)
                        self._alias(own, "phone", m.phone)
                    else:
                        # What it names is the person's from before, as for an older change.
                        self._alias(own, "phone", m.phone if m.phone != own.wa_id else None)
                        for bsuid in (change.previous_bsuid, m.bsuid):
                            self._alias(own, "bsuid", bsuid if bsuid != own.bsuid else None)
                    self._alias(own, "phone", new_phone)
                    return own
                if (
                    self._another_person(holder, *mine) or self._left_alone(holder, m, *mine)
                ) and not self._moved_in(holder, own, m):
                    if own is None or (own.keys_changed_at or 0.0) <= m.timestamp:
                        # The new number was someone else's: it is recycled to this person.
                        own = own or self.start(
                            account, phone=None, bsuid=change.new_bsuid or sender
                        )
                        self._release(holder, own)
                    # Else an older change: the person has left the number since, and its
                    # holder (who had it before) may have it again; it stays theirs.
                else:
                    own = self._one([own, holder])
        else:
            new_phone = m.phone
            recycled = None if recycled is None else self.by_id[recycled.id]
            if recycled is not None and recycled.superseded_by is None and recycled != own:
                own = own or self.start(account, phone=None, bsuid=change.new_bsuid)
                self._release(recycled, own)
            holder = self._live(account, phone=new_phone)
            if holder is not None and (own is None or holder.id != own.id):
                # Someone else's since this change was sent (above): the number stays theirs.
                new_phone = None
        if own is None:
            fresh = self.start(account, phone=new_phone, bsuid=change.new_bsuid or sender)
            fresh = self._put(msgspec.structs.replace(fresh, keys_changed_at=m.timestamp))
            # What the person was known by before: their messages from before the change,
            # delivered after it (Meta retries for days), join this conversation.
            self._alias(fresh, "bsuid", change.previous_bsuid)
            self._alias(fresh, "phone", m.phone if m.phone != new_phone else None)
            return fresh
        if own.keys_changed_at is not None and m.timestamp < own.keys_changed_at:
            # An older change arriving late: what it names still finds the conversation, but
            # the newer change stands.
            self._alias(own, "phone", m.phone if m.phone != own.wa_id else None)
            self._alias(own, "phone", new_phone if new_phone != own.wa_id else None)
            for bsuid in (change.previous_bsuid, m.bsuid, change.new_bsuid):
                self._alias(own, "bsuid", bsuid if bsuid != own.bsuid else None)
            return own
        if change.kind == "number":
            # A new number comes with a new BSUID (META.md §3b); until a message brings it, the
            # conversation is keyed by the phone (the old BSUID stays an alias).
            new_bsuid = change.new_bsuid or (sender if sender != own.bsuid else None)
            if sender is None and m.bsuid not in (None, own.bsuid):
                # Sent under the BSUID the change names as the previous one, which the
                # conversation did not have yet (its change came first or is still to come).
                self._alias(own, "bsuid", m.bsuid)
            if m.phone not in (own.wa_id, new_phone):
                # The number it was sent from, which the conversation did not have (a user
                # known by BSUID alone): theirs before the change.
                self._alias(own, "phone", m.phone)
            if change.previous_bsuid not in (own.bsuid, new_bsuid, m.bsuid):
                # One the conversation never had (keyed by phone since a number change).
                self._alias(own, "bsuid", change.previous_bsuid)
            if new_bsuid is None and own.bsuid is not None:
                self._alias(own, "bsuid", own.bsuid)
                own = self._put(msgspec.structs.replace(own, bsuid=None))
        else:
            new_bsuid = change.new_bsuid
            if change.previous_bsuid not in (own.bsuid, new_bsuid):
                # One the conversation never had (keyed by phone since a number change).
                self._alias(own, "bsuid", change.previous_bsuid)
        rekeyed = self._rekey(own, phone=new_phone, bsuid=new_bsuid)
        return self._put(
            msgspec.structs.replace(
                rekeyed,
                parent_bsuid=change.new_parent_bsuid or rekeyed.parent_bsuid,
                keys_changed_at=m.timestamp,
            )
        )

    def _with_later(self, own: Conversation | None, m: InboundMessage) -> Conversation | None:
        """Join ``own`` with the conversation this person's later changes started.

        Changes may arrive out of order: a later one, arriving first, started a conversation
        that has this change's new number or BSUID as a former one, and changed after this
        one. That is where the person is now: the two are merged (the click decides which
        stays, as in any merge) under the later change's identifiers.

        By the new number only when the change names no new BSUID: a number is recycled, and
        a conversation that left it may be its previous owner's, changed since; the person's
        own later change, sent from the new number, names the new BSUID it had there."""
        change = m.change
        assert change is not None
        new_phone = change.new_phone if change.kind == "number" and not change.new_bsuid else None
        later = self._formerly(m.account_id, bsuid=change.new_bsuid) or self._left_after(
            m.account_id, new_phone, m.timestamp
        )
        if later is None or (later.keys_changed_at or 0.0) <= m.timestamp:
            return own
        if own is None or own.id == later.id:
            return later
        survivor = self._merge(own, later)
        for c in (own, survivor):
            self._alias(survivor, "phone", c.wa_id if c.wa_id != later.wa_id else None)
            self._alias(survivor, "bsuid", c.bsuid if c.bsuid != later.bsuid else None)
        return self._put(
            msgspec.structs.replace(
                survivor,
                wa_id=later.wa_id,
                bsuid=later.bsuid,
                keys_changed_at=later.keys_changed_at,
            )
        )

    def _left_after(
        self, account_id: str, phone: str | None, at: float, *bsuids: str | None
    ) -> Conversation | None:
        """Return the live conversation that left ``phone`` after ``at`` (changed, and still
        had the number in a message sent after it): the person's own later change, come first.
        One that left the number before is its previous owner's: the number was recycled since.
        Sent, not received: everything is received after it was sent, late ones by days.

        Nor one with another BSUID than ``bsuids`` (those the change applied now names), none
        of them among its former ones: someone else had the number after the change was sent
        and left it since (the number recycled, its previous owner's move still to come)."""
        former = self._formerly(account_id, phone=phone)
        if former is None or (former.keys_changed_at or 0.0) <= at:
            return None
        if self._former_at.get((account_id, "phone", phone or ""), 0.0) <= at:
            return None
        return None if self._another_person(former, *bsuids) else former

    @staticmethod
    def _moved_in(holder: Conversation, own: Conversation | None, m: InboundMessage) -> bool:
        """Is ``holder`` of the new number this person's conversation since the change?

        A new number comes with a new BSUID that a ``user_changed_number`` need not name
        (META.md §3b): its first messages, delivered before the change, started a
        conversation under it. A recycled number's previous owner wrote from it before the
        change, never after (it was no longer theirs); this one writes after. Not when the
        change names the new BSUID, nor when it is older than one already applied."""
        change = m.change
        assert change is not None
        return (
            change.new_bsuid is None
            and holder.last_inbound_at is not None
            and holder.last_inbound_at > m.timestamp
            and (own is None or (own.keys_changed_at or 0.0) <= m.timestamp)
        )

    def _restore(self, own: Conversation, previous_bsuid: str) -> Conversation:
        """Undo a recycled number that a user_changed_user_id explains.

        A message under the new BSUID that comes before the change (Meta does not promise
        order) finds the phone held by the previous BSUID's conversation, and takes it as a
        recycled number. The change says both BSUIDs are one person: that conversation gets
        its phone back and is merged with the one that took it (the click decides which
        stays, as in any merge). Return the survivor."""
        for c in list(self.by_id.values()):
            if (
                c.account_id == own.account_id
                and c.bsuid == previous_bsuid
                and c.superseded_by == own.id
                and c.phone_released_at is not None
                and c.wa_id == own.wa_id
            ):
                restored = self._put(
                    msgspec.structs.replace(c, superseded_by=None, phone_released_at=None)
                )
                own = self._merge(self.by_id[own.id], restored)
        return own

    @staticmethod
    def _with_profile(c: Conversation, m: InboundMessage) -> Conversation:
        return msgspec.structs.replace(
            c,
            parent_bsuid=m.parent_bsuid or c.parent_bsuid,
            username=m.username or c.username,
        )
