"""Structs for WhatsApp Cloud API webhook notifications (Meta's wire, snake_case).

Unknown fields are ignored, never rejected: Meta adds fields all the time. Only what capture
needs is declared; each ``changes[].value`` stays raw until its ``field`` says what it holds.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "ENVELOPE_DECODER",
    "AutomaticEvent",
    "AutomaticEventsValue",
    "Change",
    "Entry",
    "Envelope",
    "Message",
    "MessagesValue",
    "Metadata",
    "Referral",
]


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
    ctwa_clid: str | None = None


class Message(MetaStruct, frozen=True):
    """One inbound message; only the fields capture uses."""

    from_: str = msgspec.field(name="from")
    id: str
    timestamp: str
    type: str | None = None
    referral: Referral | None = None


class Metadata(MetaStruct, frozen=True):
    phone_number_id: str | None = None
    display_phone_number: str | None = None


class MessagesValue(MetaStruct, frozen=True):
    """``value`` of a ``field == "messages"`` change."""

    metadata: Metadata | None = None
    messages: list[Message] = msgspec.field(default_factory=list)
    # Delivery receipts: acknowledged and ignored; only counted.
    statuses: list[msgspec.Raw] = msgspec.field(default_factory=list)


class AutomaticEvent(MetaStruct, frozen=True):
    """A purchase or lead Meta detected in a CTWA chat (``field == "automatic_events"``)."""

    id: str
    event_name: str
    timestamp: int | float | str | None = None
    ctwa_clid: str | None = None
    custom_data: dict[str, object] | None = None


class AutomaticEventsValue(MetaStruct, frozen=True):
    metadata: Metadata | None = None
    automatic_events: list[AutomaticEvent] = msgspec.field(default_factory=list)


class Change(MetaStruct, frozen=True):
    field: str
    # Decoded later, by ``field``: each field has its own shape.
    value: msgspec.Raw


class Entry(MetaStruct, frozen=True):
    id: str
    changes: list[Change] = msgspec.field(default_factory=list)


class Envelope(MetaStruct, frozen=True):
    object: str
    entry: list[Entry] = msgspec.field(default_factory=list)


ENVELOPE_DECODER = msgspec.json.Decoder(Envelope)
MESSAGES_DECODER = msgspec.json.Decoder(MessagesValue)
AUTOMATIC_EVENTS_DECODER = msgspec.json.Decoder(AutomaticEventsValue)
