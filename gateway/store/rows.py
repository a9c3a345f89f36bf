"""One row mapper: every record to and from its row, and the column lists they share.

Conversations map field for field (the columns are named and ordered as the Struct's
fields); events and their sinks' states carry JSON columns (the Meta event, warnings, how the
conversation was found, the request's digests), encoded and decoded here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from gateway.domain import (
    Conversation,
    QueuedEvent,
    Resolution,
    SinkState,
    StoredEvent,
    overall_status,
)

__all__ = [
    "CONVERSATION_COLUMNS",
    "CONVERSATION_FIELDS",
    "DELIVERY_COLUMNS",
    "DELIVERY_STATE_COLUMNS",
    "DELIVERY_VALUES",
    "EVENT_COLUMNS",
    "INSERT_CONVERSATION",
    "INSERT_DELIVERY",
    "INSERT_DELIVERY_HEAD",
    "MUTABLE_CONVERSATION_FIELDS",
    "QUEUED_COLUMNS",
    "conversation_from_row",
    "conversation_params",
    "delivery_row",
    "event_from_row",
    "event_params",
    "insert_events",
    "queued_from_row",
    "sink_state_from_row",
]

# The conversations columns, in the order of Conversation's fields.
CONVERSATION_FIELDS: tuple[str, ...] = Conversation.__struct_fields__
CONVERSATION_COLUMNS = ", ".join(CONVERSATION_FIELDS)
INSERT_CONVERSATION = (
    f"INSERT INTO conversations ({CONVERSATION_COLUMNS})"
    f" VALUES ({', '.join('?' * len(CONVERSATION_FIELDS))})"
)
# What capture may change on an existing conversation.
MUTABLE_CONVERSATION_FIELDS: tuple[str, ...] = tuple(
    f for f in CONVERSATION_FIELDS if f not in {"id", "account_id", "created_at"}
)
EVENT_COLUMNS = (
    "pk, account_id, event_id, event_name, conversation_id, event_time, status, event,"
    " test_event_code, received_at, duration_ms, attribution_window_expired, resolution,"
    " request_fields"
)


DELIVERY_COLUMNS = (
    "event_pk, sink, status, attempts, payload, error, error_code, trace_id, events_received,"
    " warnings, next_attempt_at, updated_at"
)
INSERT_DELIVERY_HEAD = f"INSERT INTO deliveries ({DELIVERY_COLUMNS}) VALUES"
DELIVERY_VALUES = f"({','.join('?' * 12)})"
INSERT_DELIVERY = f"{INSERT_DELIVERY_HEAD} {DELIVERY_VALUES}"
# A sink's state, as _with_deliveries reads it (after event_pk and sink).
DELIVERY_STATE_COLUMNS = (
    "status, attempts, payload, error, error_code, trace_id, events_received, warnings"
)
_INSERT_EVENTS_HEAD = (
    "INSERT INTO events (account_id, event_id, event_name, conversation_id, event_time,"
    " status, event, test_event_code, received_at, duration_ms,"
    " attribution_window_expired, resolution, request_fields, insert_token) VALUES"
)
# insert_token: a column of schema 1 nothing reads any more (a multi-row INSERT tells which
# rows it inserted by their rowids); the empty string costs a byte.
_EVENT_VALUES = f"({','.join('?' * 13)},'')"
# What a sink needs to send a queued event (deliveries d JOIN events e).
QUEUED_COLUMNS = (
    "e.pk, e.account_id, e.event_id, e.event_name, e.event, e.test_event_code, e.event_time,"
    " d.attempts"
)

_encode = msgspec.json.Encoder().encode
_decode_object = msgspec.json.Decoder(dict[str, Any]).decode
_decode_warnings = msgspec.json.Decoder(list[str]).decode
_decode_resolution = msgspec.json.Decoder(Resolution).decode
_decode_fields = msgspec.json.Decoder(dict[str, str]).decode


def _optional(value: object) -> bytes | None:
    return None if value is None else _encode(value)


def conversation_from_row(row: Any) -> Conversation:
    """Return the Conversation a ``SELECT CONVERSATION_COLUMNS`` row holds."""
    return Conversation(**dict(zip(CONVERSATION_FIELDS, row, strict=True)))


def conversation_params(conversation: Conversation) -> tuple[Any, ...]:
    """Return a conversation's values in ``CONVERSATION_COLUMNS`` order."""
    return tuple(getattr(conversation, field) for field in CONVERSATION_FIELDS)


def insert_events(events: Sequence[StoredEvent]) -> tuple[str, list[Any]]:
    """Return one statement inserting these events (each unless its key exists)."""
    sql = (
        f"{_INSERT_EVENTS_HEAD} {','.join([_EVENT_VALUES] * len(events))}"
        " ON CONFLICT (account_id, event_id) DO NOTHING"
    )
    params = [v for e in events for v in event_params(e, overall_status(e.deliveries))]
    return sql, params


def event_params(event: StoredEvent, status: str) -> tuple[Any, ...]:
    """Return an event's values in the order of :func:`insert_events`' columns."""
    return (
        event.account_id,
        event.event_id,
        event.event_name,
        event.conversation_id,
        event.event_time,
        status,
        _encode(event.event),
        event.test_event_code,
        event.received_at,
        event.duration_ms,
        event.attribution_window_expired,
        _optional(event.resolution),
        _optional(event.request_fields),
    )


def event_from_row(row: Any, deliveries: dict[str, SinkState]) -> StoredEvent:
    """Return the StoredEvent a ``SELECT EVENT_COLUMNS`` row holds, with its sinks' states."""
    return StoredEvent(
        pk=row[0],
        account_id=row[1],
        event_id=row[2],
        event_name=row[3],
        conversation_id=row[4],
        event_time=row[5],
        status=row[6],
        event=_decode_object(row[7]),
        test_event_code=row[8],
        received_at=row[9],
        duration_ms=row[10],
        attribution_window_expired=bool(row[11]),
        resolution=None if row[12] is None else _decode_resolution(row[12]),
        request_fields=None if row[13] is None else _decode_fields(row[13]),
        deliveries=deliveries,
    )


def delivery_row(pk: int, sink: str, state: SinkState, now: float) -> tuple[Any, ...]:
    """Return a deliveries row; a pending delivery is due at once."""
    return (
        pk,
        sink,
        state.status,
        state.attempts,
        _optional(state.payload),
        state.error,
        state.error_code,
        state.trace_id,
        state.events_received,
        _optional(state.warnings),
        now if state.status == "pending" else None,
        now,
    )


def sink_state_from_row(row: Any) -> SinkState:
    """Return the SinkState a ``SELECT DELIVERY_STATE_COLUMNS`` row holds."""
    status, attempts, payload, error, code, trace, received, warnings = row
    return SinkState(
        status=status,
        attempts=attempts,
        payload=None if payload is None else _decode_object(payload),
        error=error,
        error_code=code,
        trace_id=trace,
        events_received=received,
        warnings=None if warnings is None else _decode_warnings(warnings),
    )


def queued_from_row(row: Any) -> QueuedEvent:
    """Return the QueuedEvent a ``SELECT QUEUED_COLUMNS`` row holds."""
    return QueuedEvent(
        pk=row[0],
        account_id=row[1],
        event_id=row[2],
        event_name=row[3],
        event=_decode_object(row[4]),
        test_event_code=row[5],
        event_time=row[6],
        attempts=row[7],
    )
