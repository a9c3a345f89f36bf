"""What plugins may ask of the store: reads that find conversations and events, and the
dataset registry. The SQLite :class:`gateway.store.database.Store` is one implementation; a
plugin typed against this protocol keeps working on any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.domain import Conversation, PhoneMatch, StoredEvent

__all__ = ["Store"]


class Store(Protocol):
    """The store as plugins see it (resolvers get it as ``store``; lifespans too)."""

    async def get_conversation(self, account_id: str, conversation_id: str) -> Conversation | None:
        """Return the conversation with this id on this account."""
        ...

    async def conversations_for_phones(
        self, account_id: str, phones: Sequence[str]
    ) -> list[PhoneMatch]:
        """Return the conversations known by any of these phones (digits with country code),
        best first: with a click, then most recent. A number the person had before a change
        matches through its alias; a recycled number's previous owner does not match."""
        ...

    async def latest_conversation_for_bsuid(
        self, account_id: str, bsuid: str
    ) -> Conversation | None:
        """Return the most recent conversation with a click of this BSUID (or parent or former
        BSUID), else the most recent one."""
        ...

    async def find_event(self, account_id: str, event_id: str) -> StoredEvent | None:
        """Return the stored event with this eventId on this account, with its sinks' states."""
        ...

    async def datasets(self) -> dict[str, str]:
        """Return the Meta dataset id stored per account (``POST /v1/whatsapp/dataset``)."""
        ...

    async def save_dataset(self, account_id: str, dataset_id: str) -> None:
        """Remember an account's dataset id."""
        ...
