"""One row mapper: every record to and from its row, and the column lists they share.

Conversations map field for field (the columns are named and ordered as the Struct's
fields); events and their sinks' states carry JSON columns (the Meta event, warnings, how the
conversation was found, the request's digests), encoded and decoded here and nowhere else.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from gateway.domain import (
    Conversation,
    QueuedEvent,
    Resolution,
    SinkState,
    StoredEvent,
)
from gateway.store.sql import NULL
from gateway.wire import ERASED_DIGEST, PERSONAL_FIELDS

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
    "Money",
    "conversation_from_row",
    "conversation_params",
    "delivery_row",
    "event_from_row",
    "event_params",
    "insert_deliveries",
    "insert_events",
    "insert_events_unnest",
    "queued_from_row",
    "scrubbed_fields",
    "sink_state_from_row",
    "value_and_currency",
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
    " request_fields, custom_value, custom_currency"
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
    " attribution_window_expired, resolution, request_fields, custom_value, custom_currency,"
    " insert_token) VALUES"
)
# insert_token: a column of schema 1 nothing reads any more (a multi-row INSERT tells which
# rows it inserted by their rowids); the empty string costs a byte.
_EVENT_VALUES = f"({','.join('?' * 15)},'')"
# What a sink needs to send a queued event (deliveries d JOIN events e).
QUEUED_COLUMNS = (
    "e.pk, e.account_id, e.event_id, e.event_name, e.event, e.test_event_code, e.event_time,"
    " d.attempts, e.custom_value, e.custom_currency"
)

_encode = msgspec.json.Encoder().encode
_decode_object = msgspec.json.Decoder(dict[str, Any]).decode
_decode_warnings = msgspec.json.Decoder(list[str]).decode
_decode_resolution = msgspec.json.Decoder(Resolution).decode
_decode_resolution_list = msgspec.json.Decoder(list[Any]).decode
_decode_strings = msgspec.json.Decoder(list[str]).decode
_decode_fields = msgspec.json.Decoder(dict[str, str]).decode


def _optional(value: object) -> bytes | None:
    return None if value is None else _encode(value)


# Compact forms (events stored since version 0.7; older rows are read as they were written):
# each saves bytes on every event, which is the store's size.
#
# - The Meta event leaves out event_name, event_id and event_time, which have columns of
#   their own, and action_source and messaging_channel when they say what every CTWA event
#   says; they are put back, first and in the order the normalizers set them, when it is
#   read. Every finished event has all five (EventDraft.finish), so a stored body without
#   event_name is a compact one.
_CTWA = {"action_source": "business_messaging", "messaging_channel": "whatsapp"}
_LEFT_OUT = frozenset({"event_name", "event_id", "event_time", *_CTWA})


def _event_blob(event: StoredEvent) -> bytes:
    body = event.event
    if (
        body.get("event_name") == event.event_name
        and body.get("event_id") == event.event_id
        and body.get("event_time") == event.event_time
        and body.get("action_source") == _CTWA["action_source"]
        and body.get("messaging_channel") == _CTWA["messaging_channel"]
    ):
        compact = {k: v for k, v in body.items() if k not in _LEFT_OUT}
        custom = compact.get("custom_data")
        if custom is not None and _in_columns(custom) and next(reversed(compact)) == "custom_data":
            # The reporting columns hold it: a float value is left out with it, an integer
            # one leaves a 0 saying so.
            if type(custom["value"]) is int:
                compact["custom_data"] = 0
            else:
                del compact["custom_data"]
        return _encode(compact)
    return _encode(body)


def _in_columns(custom: object) -> bool:
    """Whether ``custom_data`` is exactly what the custom_value and custom_currency columns
    hold (currency, then a value): then it is put back from them when read."""
    if type(custom) is not dict or list(custom) != ["currency", "value"]:
        return False
    value = custom["value"]
    if type(value) is float:
        # A REAL column keeps neither NaN (it becomes NULL) nor the sign of -0.0.
        exact = math.isfinite(value) and (value != 0 or math.copysign(1, value) > 0)
    else:
        exact = type(value) is int and abs(value) <= _EXACT_INT
    return exact and type(custom["currency"]) is str


# The largest integer a REAL column holds exactly.
_EXACT_INT = 2**53


def _event_from(
    blob: bytes,
    event_name: str,
    event_id: str,
    event_time: int,
    value: float | None,
    currency: str | None,
) -> dict[str, Any]:
    body = _decode_object(blob)
    if "event_name" in body:
        return body
    event = {
        "event_name": event_name,
        "event_id": event_id,
        **_CTWA,
        "event_time": event_time,
        **body,
    }
    if value is not None and currency is not None:
        left = event.get("custom_data", _ABSENT)
        if left is _ABSENT:
            event["custom_data"] = {"currency": currency, "value": value}
        elif left == 0:
            event["custom_data"] = {"currency": currency, "value": int(value)}
    return event


_ABSENT = object()


# - The request's field checksums (8 hex digits each, :func:`gateway.wire.request_fingerprint`)
#   are packed: two bytes saying which fields were sent, then four bytes per field.
# Append only: a stored mask's bits are positions in this list.
_FIELDS = (
    "eventName",
    "conversationId",
    "phoneE164",
    "businessScopedUserId",
    "value",
    "currency",
    "contentIds",
    "email",
    "externalId",
    "testCode",
    "eventTime",
)


def _fields_blob(fields: dict[str, str] | None) -> bytes | None:
    if fields is None:
        return None
    packing = _packing(tuple(fields))
    if packing is None or set(map(len, fields.values())) - {8}:
        return _encode(fields)  # not a CRC fingerprint: kept as it is
    mask, in_order = packing
    if not in_order:
        # Packed in the order of _FIELDS (a fingerprint's own order already).
        fields = {name: fields[name] for name in _FIELDS if name in fields}
    joined = "".join(fields.values())
    try:
        digests = bytes.fromhex(joined)
    except ValueError:
        return _encode(fields)  # not hex digits: kept as it is
    if digests.hex() != joined:
        return _encode(fields)  # spaces or capitals, which fromhex takes: kept as they are
    return mask.to_bytes(2, "big") + digests


@functools.lru_cache(maxsize=256)
def _packing(names: tuple[str, ...]) -> tuple[int, bool] | None:
    """The mask of fields named ``names`` and whether they are in the order of _FIELDS
    (None if one is not among them); requests send one of a few sets of fields."""
    bits = [_FIELD_BIT.get(name, 0) for name in names]
    if 0 in bits:
        return None
    return sum(bits), bits == sorted(bits)


def scrubbed_fields(blob: bytes | None) -> bytes | None:
    """A stored fingerprint with the digests of the person's fields replaced by
    :data:`~gateway.wire.ERASED_DIGEST` (kept as JSON, which is what it then is)."""
    fields = _fields_from(blob)
    if fields is None:
        return None
    return _encode(
        {name: ERASED_DIGEST if name in PERSONAL_FIELDS else d for name, d in fields.items()}
    )


def _fields_from(blob: bytes | None) -> dict[str, str] | None:
    if blob is None:
        return None
    if blob[:1] == b"{":
        return _decode_fields(blob)  # JSON: stored by an earlier version
    mask = int.from_bytes(blob[:2], "big")
    fields = {}
    offset = 2
    for name in _FIELDS:
        if mask & _FIELD_BIT[name]:
            fields[name] = blob[offset : offset + 4].hex()
            offset += 4
    return fields


_FIELD_BIT = {name: 1 << i for i, name in enumerate(_FIELDS)}


# - A sink's payload that carries the event itself (Meta's ``{"data": [event], ...}``) is
#   stored with this in place of the list, and the event put back when it is read: an
#   event's body is stored once, not once more per sink.
_THE_EVENT = "$event"


#   Meta's own shape, ``{"data": [event], "partner_agent": ..., ["test_event_code": ...]}``,
#   is stored as the list of its strings alone.
_META_SHAPES = (["data", "partner_agent"], ["data", "partner_agent", "test_event_code"])


def _payload_blob(payload: dict[str, Any] | None, event: dict[str, Any] | None) -> bytes | None:
    if payload is None:
        return None
    data = payload.get("data")
    if (
        event is not None
        and type(data) is list
        and len(data) == 1
        and data[0] is event
        and len(payload) == 2
        and next(iter(payload)) == "data"
        and type(partner := payload.get("partner_agent")) is str
    ):
        # The usual payload, the stored event itself and a partner agent: told at once.
        return _encode((partner,))
    # The sink put the stored event itself in its payload (the usual case): no need to
    # compare the two field by field.
    if event is not None and (
        (type(data) is list and len(data) == 1 and data[0] is event) or data == [event]
    ):
        strings = list(payload.values())[1:]
        if list(payload) in _META_SHAPES and all(type(v) is str for v in strings):
            return _encode(strings)
        return _encode({**payload, "data": _THE_EVENT})
    return _encode(payload)


def _payload_from(blob: bytes | None, event: dict[str, Any] | None) -> dict[str, Any] | None:
    if blob is None:
        return None
    if blob[:1] == b"[" and event is not None:
        strings = _decode_strings(blob)
        return {"data": [event], **dict(zip(_META_SHAPES[1][1:], strings, strict=False))}
    payload = _decode_object(blob)
    if payload.get("data") == _THE_EVENT and event is not None:
        payload["data"] = [event]
    return payload


# - How the conversation was found is a list rather than an object with its names, the
#   ``ambiguous`` flag only when it is set.
def _resolution_blob(resolution: Resolution | None) -> bytes | None:
    if resolution is None:
        return None
    r = resolution
    if r.ambiguous:
        return _encode((r.resolver, r.field, r.form, True))
    return _encode((r.resolver, r.field, r.form))


def _resolution_from(blob: bytes | None) -> Resolution | None:
    if blob is None:
        return None
    if blob[:1] == b"[":
        resolver, field, form, *ambiguous = _decode_resolution_list(blob)
        return Resolution(
            resolver=resolver, field=field, form=form, ambiguous=bool(ambiguous and ambiguous[0])
        )
    return _decode_resolution(blob)


def conversation_from_row(row: Any) -> Conversation:
    """Return the Conversation a ``SELECT CONVERSATION_COLUMNS`` row holds."""
    return Conversation(**dict(zip(CONVERSATION_FIELDS, row, strict=True)))


def conversation_params(conversation: Conversation) -> tuple[Any, ...]:
    """Return a conversation's values in ``CONVERSATION_COLUMNS`` order."""
    return tuple(getattr(conversation, field) for field in CONVERSATION_FIELDS)


# The statement texts of recent batch sizes (a batch of 500 events' is 18 kB: all 500 sizes
# would keep 8 MB).
@functools.lru_cache(maxsize=32)
def insert_events(count: int) -> str:
    """Return one statement inserting ``count`` events' rows (:func:`event_params`), each
    unless its key exists (SQLite's multi-row VALUES)."""
    return (
        f"{_INSERT_EVENTS_HEAD} {','.join([_EVENT_VALUES] * count)}"
        " ON CONFLICT (account_id, event_id) DO NOTHING"
    )


@functools.lru_cache(maxsize=32)
def insert_deliveries(count: int) -> str:
    """Return one statement inserting ``count`` :func:`delivery_row` rows (SQLite's)."""
    return f"{INSERT_DELIVERY_HEAD} {','.join([DELIVERY_VALUES] * count)}"


# The PostgreSQL types of the inserted events columns, in insert order.
_EVENT_ARRAY_TYPES = (
    "text", "text", "text", "text", "bigint", "text", "bytea", "text", "float8", "float8",
    "bigint", "bytea", "bytea", "float8", "text",
)  # fmt: skip
_INSERT_EVENTS_UNNEST = (
    f"{_INSERT_EVENTS_HEAD.removesuffix(' VALUES')} SELECT *, '' FROM unnest("
    + ", ".join(f"?::{t}[]" for t in _EVENT_ARRAY_TYPES)
    + ") ON CONFLICT (account_id, event_id) DO NOTHING RETURNING pk, account_id, event_id"
)


def insert_events_unnest(rows: Sequence[Sequence[Any]]) -> tuple[str, list[Any]]:
    """Return one statement inserting these :func:`event_params` rows from one array per
    column, with the (pk, account, eventId) of each it inserted: the same text whatever the
    batch's size, so PostgreSQL prepares and plans it once per connection (a VALUES list per
    size would be a new statement, and a new plan, for every size)."""
    columns = [[None if v is NULL else v for v in column] for column in zip(*rows, strict=True)]
    return _INSERT_EVENTS_UNNEST, columns


def event_params(event: StoredEvent, money: Money) -> tuple[Any, ...]:
    """Return an event's values in the order of :func:`insert_events`' columns, with its
    ``status``, each as the sqlite3 module binds it without adapting (NULL as
    :data:`~gateway.store.sql.NULL`, a BLOB as a bytearray, the flag as an int): the row
    goes to SQLite as it is, with no pass over it (PostgreSQL's Tx puts None back).

    ``money``: the event's :func:`value_and_currency` (its caller keeps it for the hourly
    counts too)."""
    value, currency = money
    return (
        event.account_id,
        event.event_id,
        event.event_name,
        event.conversation_id,
        event.event_time,
        event.status,
        bytearray(_event_blob(event)),
        NULL if event.test_event_code is None else event.test_event_code,
        event.received_at,
        event.duration_ms,
        int(event.attribution_window_expired),
        _bound(_resolution_blob(event.resolution)),
        _bound(_fields_blob(event.request_fields)),
        NULL if value is None else value,
        NULL if currency is None else currency,
    )


def _bound(blob: bytes | None) -> Any:
    return NULL if blob is None else bytearray(blob)


# An event's custom_data value and currency, as the reporting columns hold them.
Money = tuple[float | None, str | None]


def value_and_currency(event: dict[str, Any]) -> Money:
    """The Meta event's ``custom_data`` value and currency, for the reporting columns."""
    custom = event.get("custom_data")
    if not isinstance(custom, dict):
        return None, None
    value, currency = custom.get("value"), custom.get("currency")
    if type(value) is not float:  # the usual type, checked first
        value = float(value) if isinstance(value, _NUMBERS) and type(value) is not bool else None
    return (
        value if value is not None and math.isfinite(value) else None,
        currency if isinstance(currency, str) else None,
    )


_NUMBERS = (int, float)


def event_from_row(row: Any, sinks: Iterable[Sequence[Any]]) -> StoredEvent:
    """Return the StoredEvent a ``SELECT EVENT_COLUMNS`` row holds, with its sinks' states
    from ``(sink, *DELIVERY_STATE_COLUMNS)`` rows."""
    event = _event_from(row[7], row[3], row[2], row[5], row[14], row[15])
    return StoredEvent(
        pk=row[0],
        account_id=row[1],
        event_id=row[2],
        event_name=row[3],
        conversation_id=row[4],
        event_time=row[5],
        status=row[6],
        event=event,
        test_event_code=row[8],
        received_at=row[9],
        duration_ms=row[10],
        attribution_window_expired=bool(row[11]),
        resolution=_resolution_from(row[12]),
        request_fields=_fields_from(row[13]),
        deliveries={sink: sink_state_from_row(state, event) for sink, *state in sinks},
    )


def delivery_row(
    pk: int, sink: str, state: SinkState, now: float, event: dict[str, Any] | None = None
) -> tuple[Any, ...]:
    """Return a deliveries row, bound as :func:`event_params`' are; a pending delivery is
    due at once. ``event``: the Meta event as stored, which a payload carrying it refers to
    instead of copying."""
    return (
        pk,
        sink,
        state.status,
        state.attempts,
        _bound(_payload_blob(state.payload, event)),
        NULL if state.error is None else state.error,
        NULL if state.error_code is None else state.error_code,
        NULL if state.trace_id is None else state.trace_id,
        state.events_received,
        _bound(_optional(state.warnings)),
        now if state.status == "pending" else NULL,
        now,
    )


def sink_state_from_row(row: Any, event: dict[str, Any] | None = None) -> SinkState:
    """Return the SinkState a ``SELECT DELIVERY_STATE_COLUMNS`` row holds (``event``: its
    event's Meta body, for a payload that refers to it)."""
    status, attempts, payload, error, code, trace, received, warnings = row
    return SinkState(
        status=status,
        attempts=attempts,
        payload=_payload_from(payload, event),
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
        event=_event_from(row[4], row[3], row[2], row[6], row[8], row[9]),
        test_event_code=row[5],
        event_time=row[6],
        attempts=row[7],
    )
