"""Structs for WhatsApp Cloud API webhook notifications (Meta's wire, snake_case), and the limits.

Unknown fields are ignored, never rejected: Meta adds fields all the time. Every level that
holds a list stays ``msgspec.Raw`` until its items are decoded one by one, so one item Meta
shaped differently (or a hostile one) is recorded as unprocessed without failing its siblings.

Identity (META.md §3b): since 2026 a sender is a business-scoped user id (BSUID,
``from_user_id``), a phone (``from``), or both; either may be absent, never both.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = [
    "AUTOMATIC_EVENTS_DECODER",
    "AUTOMATIC_EVENT_DECODER",
    "BSUID_SHAPE",
    "CHANGE_DECODER",
    "CONTACTS_DECODER",
    "CONTACT_DECODER",
    "ENTRY_DECODER",
    "ENVELOPE_DECODER",
    "MAX_CLICK_ID",
    "MAX_ID",
    "MAX_MESSAGES",
    "MAX_TEXT",
    "MAX_USERNAME",
    "MESSAGES_DECODER",
    "MESSAGE_DECODER",
    "AutomaticEvent",
    "AutomaticEventsValue",
    "Change",
    "Contact",
    "Entry",
    "Envelope",
    "Message",
    "MessagesValue",
    "Metadata",
    "Referral",
    "System",
    "UserId",
]

# Limits on what one notification may make us store (README, "Webhook limits"). Ids longer
# than these are refused (a truncated id is a wrong id); display texts are truncated.
# Meta's click ids are ~150 characters; 512 leaves room for growth, not for abuse.
MAX_CLICK_ID = 512
# wamids, BSUIDs (a country, a dot, up to 128 alphanumerics; parents add ".ENT"), event names.
MAX_ID = 256
# Ad headline, body, URLs: Meta's texts, kept for display.
MAX_TEXT = 2048
MAX_USERNAME = 128
# Meta batches up to 1,000 updates per POST; messages past this many are recorded unprocessed.
MAX_MESSAGES = 2000

# Ids carry no control characters: Meta's never do, and PostgreSQL's text cannot hold a NUL
# (a message whose id has one is recorded unprocessed, on either engine alike).
_NO_CONTROL = r"^[^\x00-\x1f\x7f]*\Z"
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID, pattern=_NO_CONTROL)]
# A BSUID as Meta documents it (META.md §3b): a two-letter country, a dot, up to 128
# alphanumerics; a parent BSUID has "ENT." after the country ("US.13491208655302741918",
# "US.ENT.1181..."). What the API's parameters are held to, so that a word like "text" is never
# taken for a person to erase. \Z, not $: $ also matches before a final newline.
BSUID_SHAPE = r"^[A-Z]{2}\.(?:ENT\.)?[A-Za-z0-9]{1,128}\Z"
# A sender's id in a webhook is read more loosely (printable id characters): the shape is
# Meta's example, not a promise, and a click refused for an id Meta shapes otherwise would be
# lost until a new release. Erasures rewrite only the archive's identifying keys, so a loose id
# never rewrites unrelated text.
UserId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_ID, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*\Z")
]
ClickId = Annotated[str, msgspec.Meta(max_length=MAX_CLICK_ID, pattern=_NO_CONTROL)]
# Meta sends Unix seconds as a string; numbers are tolerated.
Timestamp = str | int | float


class MetaStruct(msgspec.Struct, frozen=True, kw_only=True):
    """Base for Meta's payloads: unknown fields pass silently."""


class Referral(MetaStruct, frozen=True):
    """The ad a message came from. ``ctwa_clid`` is absent for WhatsApp Status ads."""

    source_url: str | None = None
    source_id: str | None = None
    source_type: str | None = None
    headline: str | None = None
    body: str | None = None
    media_type: str | None = None
    ctwa_clid: ClickId | None = None


class System(MetaStruct, frozen=True):
    """A system message: the sender changed their number or their BSUID.

    ``user_changed_number`` carries the new number in ``wa_id`` (``new_wa_id`` in Meta's older
    examples); ``user_changed_user_id`` the new BSUID in ``user_id`` and the old one in
    ``previous_user_id``.
    """

    type: str | None = None
    wa_id: str | None = None
    new_wa_id: str | None = None
    user_id: UserId | None = None
    parent_user_id: UserId | None = None
    previous_user_id: UserId | None = None
    previous_parent_user_id: UserId | None = None


class Message(MetaStruct, frozen=True):
    """One inbound message; only the fields capture uses."""

    id: Id
    timestamp: Timestamp
    # The phone, only when Meta may share it (META.md §3b).
    from_: str | None = msgspec.field(default=None, name="from")
    from_user_id: UserId | None = None
    from_parent_user_id: UserId | None = None
    type: str | None = None
    referral: Referral | None = None
    system: System | None = None


class Profile(MetaStruct, frozen=True):
    name: str | None = None
    username: str | None = None


class Contact(MetaStruct, frozen=True):
    """Who sent the messages of a change: their phone and/or BSUID, and their username."""

    wa_id: str | None = None
    user_id: UserId | None = None
    parent_user_id: UserId | None = None
    profile: Profile | None = None


class Metadata(MetaStruct, frozen=True):
    phone_number_id: str | None = None
    display_phone_number: str | None = None


class MessagesValue(MetaStruct, frozen=True):
    """``value`` of a ``field == "messages"`` change; each list decoded item by item."""

    metadata: Metadata | None = None
    # Auxiliary (usernames, parent BSUIDs): decoded leniently, a bad one is skipped.
    contacts: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"[]"))
    messages: list[msgspec.Raw] = msgspec.field(default_factory=list)
    # Delivery receipts (with ``recipient_id`` and/or ``recipient_user_id``): acknowledged
    # and ignored; only counted.
    statuses: list[msgspec.Raw] = msgspec.field(default_factory=list)


class AutomaticEvent(MetaStruct, frozen=True):
    """A purchase or lead Meta detected in a CTWA chat (``field == "automatic_events"``).

    It names the message (``id``, a wamid), not the user: it reaches BSUID-only and phone
    conversations alike through that message.
    """

    id: Id
    event_name: Id
    timestamp: Timestamp | None = None
    ctwa_clid: ClickId | None = None
    custom_data: dict[str, object] | None = None


class AutomaticEventsValue(MetaStruct, frozen=True):
    metadata: Metadata | None = None
    automatic_events: list[msgspec.Raw] = msgspec.field(default_factory=list)


class Change(MetaStruct, frozen=True):
    field: str
    # Decoded later, by ``field``: each field has its own shape.
    value: msgspec.Raw


class Entry(MetaStruct, frozen=True):
    id: str
    changes: list[msgspec.Raw] = msgspec.field(default_factory=list)


class Envelope(MetaStruct, frozen=True):
    object: str
    entry: list[msgspec.Raw] = msgspec.field(default_factory=list)


ENVELOPE_DECODER = msgspec.json.Decoder(Envelope)
ENTRY_DECODER = msgspec.json.Decoder(Entry)
CHANGE_DECODER = msgspec.json.Decoder(Change)
MESSAGES_DECODER = msgspec.json.Decoder(MessagesValue)
MESSAGE_DECODER = msgspec.json.Decoder(Message)
CONTACT_DECODER = msgspec.json.Decoder(Contact)
CONTACTS_DECODER = msgspec.json.Decoder(list[msgspec.Raw])
AUTOMATIC_EVENTS_DECODER = msgspec.json.Decoder(AutomaticEventsValue)
AUTOMATIC_EVENT_DECODER = msgspec.json.Decoder(AutomaticEvent)
