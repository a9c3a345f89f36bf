"""The records a webhook notification yields: messages, detected events, and problems.

Plain msgspec Structs, no behaviour: :mod:`gateway.capture.extract` makes them from Meta's
bytes, :mod:`gateway.capture.identities` and :mod:`gateway.store.capture` apply them,
:mod:`gateway.store.archive` stores the problems. Paths are JSONPath-like: ``$`` is the whole body.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from gateway.capture.payload import Referral

__all__ = [
    "ROOT",
    "CaptureBatch",
    "DetectedEvent",
    "IdentityChange",
    "InboundMessage",
    "Problem",
    "ProblemCode",
    "is_under",
]

ROOT = "$"

# Bounded: a metric label and a stable code in `webhooks list`.
ProblemCode = Literal[
    "invalid_json",
    "invalid_shape",
    "too_deep",
    "unsupported_object",
    "unknown_number",
    "no_identity",
    "invalid_phone",
    "invalid_timestamp",
    "too_many_messages",
    "processing_error",
]


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """A part of a notification that was not processed, and why (never with personal data)."""

    path: str
    code: ProblemCode
    reason: str
    account_id: str | None = None
    # For an unknown number: which one, so reprocessing can pick it up once it is configured.
    phone_number_id: str | None = None


class IdentityChange(msgspec.Struct, frozen=True, kw_only=True):
    """A system message: the sender's number or BSUID changed (META.md §3b)."""

    kind: Literal["number", "user_id"]
    new_phone: str | None = None
    new_bsuid: str | None = None
    new_parent_bsuid: str | None = None
    previous_bsuid: str | None = None


class InboundMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message from a WhatsApp user known by phone, BSUID, or both (never neither)."""

    path: str
    account_id: str
    wamid: str
    timestamp: float
    phone: str | None = None
    bsuid: str | None = None
    parent_bsuid: str | None = None
    username: str | None = None
    referral: Referral | None = None
    change: IdentityChange | None = None


class DetectedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An ``automatic_events`` item: Meta detected a lead or purchase after a message."""

    path: str
    account_id: str
    wamid: str
    event_name: str
    ctwa_clid: str | None
    custom_data: dict[str, object] | None
    occurred_at: float | None


class CaptureBatch(msgspec.Struct, kw_only=True):
    """What one notification carries, and what in it could not be processed."""

    messages: list[InboundMessage] = msgspec.field(default_factory=list)
    automatic: list[DetectedEvent] = msgspec.field(default_factory=list)
    problems: list[Problem] = msgspec.field(default_factory=list)
    statuses: int = 0
    ignored_changes: int = 0


def is_under(path: str, ancestor: str) -> bool:
    """Tell whether ``path`` is ``ancestor`` or lies inside it."""
    if not path.startswith(ancestor):
        return False
    return len(path) == len(ancestor) or path[len(ancestor)] in ".["
