"""From a signed notification's bytes to capture records, and a problem for every part that fails.

Nothing here raises for what Meta (or an attacker holding the app secret) sent: each entry,
change, message and automatic event is decoded on its own, and one that does not decode or
breaks a rule becomes a :class:`Problem` with its JSON path and a reason, while its siblings
are captured. Pure: no I/O, the clock is a parameter.

Paths are JSONPath-like (``$.entry[0].changes[1].value.messages[3]``); a problem that stops a
whole node (an unknown phone number stops its change) sits at that node, so reprocessing the
node later re-examines everything under it and nothing else (``only``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal, TypeVar

import msgspec

from gateway.capture.payload import (
    AUTOMATIC_EVENT_DECODER,
    AUTOMATIC_EVENTS_DECODER,
    CHANGE_DECODER,
    CONTACT_DECODER,
    CONTACTS_DECODER,
    ENTRY_DECODER,
    ENVELOPE_DECODER,
    MAX_MESSAGES,
    MAX_USERNAME,
    MESSAGE_DECODER,
    MESSAGES_DECODER,
    Contact,
    Message,
    MessagesValue,
    Metadata,
)
from gateway.capture.records import (
    ROOT,
    CaptureBatch,
    DetectedEvent,
    IdentityChange,
    InboundMessage,
    Problem,
    ProblemCode,
    is_under,
)
from gateway.capture.values import (
    MAX_DEPTH,
    bounded_referral,
    contact_phone,
    display_text,
    flatten_deep,
    unix_seconds,
    whatsapp_phone,
)
from gateway.config import Settings

__all__ = ["extract"]

T = TypeVar("T")


def extract(
    body: bytes, settings: Settings, *, now: float, only: Collection[str] | None = None
) -> CaptureBatch:
    """Return the records in ``body`` and a Problem for each part that failed.

    ``only``: process just the parts at or under these paths (reprocessing what failed
    before); ``None`` processes everything.
    """
    return _Extractor(settings, now, only).run(body)


class _Extractor:
    def __init__(self, settings: Settings, now: float, only: Collection[str] | None) -> None:
        self.settings = settings
        self.now = now
        self.only = None if only is None else tuple(only)
        self.batch = CaptureBatch()
        self.message_count = 0

    # -- helpers ----------------------------------------------------------------------------

    def wanted(self, path: str) -> bool:
        """Is any part of ``path`` to be processed (on the way to, or under, an ``only``)?"""
        if self.only is None:
            return True
        return any(is_under(path, u) or is_under(u, path) for u in self.only)

    def selected(self, path: str) -> bool:
        """Is ``path`` itself to be processed (at or under an ``only`` path)?"""
        return self.only is None or any(is_under(path, u) for u in self.only)

    def problem(self, path: str, code: ProblemCode, reason: str, **ids: str | None) -> None:
        if self.selected(path):
            self.batch.problems.append(Problem(path=path, code=code, reason=reason, **ids))

    def decode(self, raw: bytes, decoder: msgspec.json.Decoder[T], path: str) -> T | None:
        try:
            return decoder.decode(raw)
        except msgspec.ValidationError as exc:
            text = str(exc)
            if " - at `$" in text:
                text = text.replace(" - at `$", f" - at `{path}", 1)
            else:
                text = f"{text} - at `{path}`"
            self.problem(path, "invalid_shape", text)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            # Neither message quotes the input: byte offsets and codec names only.
            self.problem(path, "invalid_json", f"Not valid JSON (UTF-8) at `{path}`: {exc}")
        except RecursionError:
            self.problem(path, "too_deep", f"Nested too deeply to decode at `{path}`.")
        return None

    # -- levels -----------------------------------------------------------------------------

    def run(self, body: bytes) -> CaptureBatch:
        try:
            ENVELOPE_DECODER.decode(body)
        except RecursionError:
            # Items stay raw until decoded one by one, but finding where a raw item ends
            # still recurses: drop the too-deep parts so the rest can be captured.
            body = flatten_deep(body, MAX_DEPTH)
            self.problem(
                ROOT,
                "too_deep",
                f"Parts nested deeper than {MAX_DEPTH} levels were read as null; everything"
                " else was processed.",
            )
        except (msgspec.DecodeError, UnicodeDecodeError):
            pass  # reported by the decode below
        envelope = self.decode(body, ENVELOPE_DECODER, ROOT)
        if envelope is None:
            return self.batch
        if envelope.object != "whatsapp_business_account":
            self.problem(
                ROOT,
                "unsupported_object",
                f"`$.object` is {envelope.object[:64]!r}, not 'whatsapp_business_account':"
                " this endpoint takes WhatsApp Business Account notifications only.",
            )
            return self.batch
        for i, raw_entry in enumerate(envelope.entry):
            path = f"$.entry[{i}]"
            if self.wanted(path):
                self.entry(raw_entry, path)
        return self.batch

    def entry(self, raw: msgspec.Raw, path: str) -> None:
        entry = self.decode(raw, ENTRY_DECODER, path)
        if entry is None:
            return
        for j, raw_change in enumerate(entry.changes):
            where = f"{path}.changes[{j}]"
            if self.wanted(where):
                self.change(raw_change, where, entry.id)

    def change(self, raw: msgspec.Raw, path: str, waba_id: str) -> None:
        change = self.decode(raw, CHANGE_DECODER, path)
        if change is None:
            return
        value_path = f"{path}.value"
        if change.field == "messages":
            messages = self.decode(change.value, MESSAGES_DECODER, value_path)
            if messages is not None:
                account_id = self.account(messages.metadata, waba_id, path)
                if account_id is not None:
                    self.messages(messages, account_id, value_path)
        elif change.field == "automatic_events":
            detected = self.decode(change.value, AUTOMATIC_EVENTS_DECODER, value_path)
            if detected is not None:
                account_id = self.account(detected.metadata, waba_id, path)
                if account_id is not None:
                    for k, raw_event in enumerate(detected.automatic_events):
                        where = f"{value_path}.automatic_events[{k}]"
                        if self.selected(where):
                            self.automatic(raw_event, account_id, where)
        elif self.selected(path):
            self.batch.ignored_changes += 1

    def account(self, metadata: Metadata | None, waba_id: str, path: str) -> str | None:
        number = metadata.phone_number_id if metadata else None
        account = self.settings.account_for_number(number, waba_id)
        if account is not None:
            return account.id
        shown = (number or waba_id)[:64]
        self.problem(
            path,
            "unknown_number",
            f"No account for phone_number_id {shown!r}: add it to [[accounts]] in the config,"
            " then run `ctwa-gateway webhooks reprocess`.",
            phone_number_id=shown,
        )
        return None

    def messages(self, value: MessagesValue, account_id: str, path: str) -> None:
        self.batch.statuses += len(value.statuses) if self.selected(path) else 0
        contacts = self.contacts(value.contacts)
        for k, raw in enumerate(value.messages):
            where = f"{path}.messages[{k}]"
            if not self.selected(where):
                continue
            self.message_count += 1
            if self.message_count > MAX_MESSAGES:
                self.problem(
                    f"{path}.messages",
                    "too_many_messages",
                    f"`{path}.messages[{k}:]` are past the limit of {MAX_MESSAGES} messages"
                    " per notification.",
                    account_id=account_id,
                )
                return
            message = self.decode(raw, MESSAGE_DECODER, where)
            if message is not None:
                self.message(message, contacts, account_id, where)

    def contacts(self, value: msgspec.Raw) -> dict[str, Contact]:
        """Index the change's contacts by BSUID and by phone; what does not decode is skipped
        (contacts only add a username, a parent BSUID and a phone the message may lack)."""
        found: dict[str, Contact] = {}
        try:
            raws = CONTACTS_DECODER.decode(value)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return found
        for raw in raws:
            try:
                contact = CONTACT_DECODER.decode(raw)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                continue
            for key in (contact.user_id, contact.wa_id):
                if key:
                    found.setdefault(key, contact)
        return found

    def message(
        self, message: Message, contacts: dict[str, Contact], account_id: str, path: str
    ) -> None:
        contact = contacts.get(message.from_user_id or "") or contacts.get(message.from_ or "")
        bsuid = message.from_user_id or (contact.user_id if contact else None)
        try:
            phone = whatsapp_phone(message.from_) or contact_phone(contact)
        except ValueError:
            self.problem(
                path,
                "invalid_phone",
                f"`{path}.from` is not a WhatsApp phone id (6 to 20 digits).",
                account_id=account_id,
            )
            return
        change = self.identity_change(message, path, account_id)
        if change is False:
            return
        if phone is None and bsuid is None and not (change and change.new_phone):
            self.problem(
                path,
                "no_identity",
                f"`{path}` has neither `from` (phone) nor `from_user_id` (BSUID).",
                account_id=account_id,
            )
            return
        timestamp = unix_seconds(message.timestamp, self.now)
        if timestamp is None:
            self.problem(
                path,
                "invalid_timestamp",
                f"`{path}.timestamp` is not a plausible Unix time (seconds or milliseconds,"
                " 2009 to tomorrow).",
                account_id=account_id,
            )
            return
        username = contact.profile.username if contact and contact.profile else None
        self.batch.messages.append(
            InboundMessage(
                path=path,
                account_id=account_id,
                wamid=message.id,
                timestamp=timestamp,
                phone=phone,
                bsuid=bsuid,
                parent_bsuid=message.from_parent_user_id
                or (contact.parent_user_id if contact else None),
                username=display_text(username, MAX_USERNAME) or None,
                referral=None if message.referral is None else bounded_referral(message.referral),
                change=change,
            )
        )

    def identity_change(
        self, message: Message, path: str, account_id: str
    ) -> IdentityChange | Literal[False] | None:
        """Return the change a system message announces; False (and a problem) if malformed."""
        system = message.system
        if message.type != "system" or system is None:
            return None
        if system.type == "user_changed_number":
            try:
                new_phone = whatsapp_phone(system.wa_id or system.new_wa_id)
            except ValueError:
                new_phone = None
            if new_phone is None:
                self.problem(
                    path,
                    "invalid_phone",
                    f"`{path}.system.wa_id` (the new number) is missing or not 6 to 20 digits.",
                    account_id=account_id,
                )
                return False
            return IdentityChange(
                kind="number",
                new_phone=new_phone,
                new_bsuid=system.user_id,
                new_parent_bsuid=system.parent_user_id,
                previous_bsuid=system.previous_user_id,
            )
        if system.type == "user_changed_user_id":
            return IdentityChange(
                kind="user_id",
                new_bsuid=system.user_id or message.from_user_id,
                new_parent_bsuid=system.parent_user_id or message.from_parent_user_id,
                previous_bsuid=system.previous_user_id,
            )
        return None  # other system messages (customer_identity_changed, ...) change nothing

    def automatic(self, raw: msgspec.Raw, account_id: str, path: str) -> None:
        event = self.decode(raw, AUTOMATIC_EVENT_DECODER, path)
        if event is None:
            return
        occurred_at = None
        if event.timestamp is not None:
            occurred_at = unix_seconds(event.timestamp, self.now)
            if occurred_at is None:
                self.problem(
                    path,
                    "invalid_timestamp",
                    f"`{path}.timestamp` is not a plausible Unix time.",
                    account_id=account_id,
                )
                return
        self.batch.automatic.append(
            DetectedEvent(
                path=path,
                account_id=account_id,
                wamid=event.id,
                event_name=event.event_name,
                ctwa_clid=event.ctwa_clid or None,
                custom_data=event.custom_data,
                occurred_at=occurred_at,
            )
        )
