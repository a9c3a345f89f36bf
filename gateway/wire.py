"""Wire Structs: the HTTP API's requests, responses and errors, and their encoders.

The request side follows Zernio's ``SendWhatsAppConversionRequest`` (camelCase, unknown fields
rejected by name) so an existing Zernio client works unchanged; the response side is Zernio's
shape plus fields of our own that say what happened (``eventId``, ``status``, ``payload``...).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from typing import Annotated, Any

import msgspec

__all__ = [
    "CONVERSION_DECODER",
    "CONVERSION_TEXT_FIELDS",
    "ENCODER",
    "ERASED_DIGEST",
    "PERSONAL_FIELDS",
    "AttemptView",
    "ConversationList",
    "ConversationMetadata",
    "ConversationView",
    "ConversionRequest",
    "ConversionResponse",
    "DatasetAnswer",
    "DatasetRequest",
    "DeliveryDetail",
    "DeliveryView",
    "ErasureAnswer",
    "ErasureCounts",
    "ErrorBody",
    "EventDetail",
    "EventList",
    "EventSummary",
    "Failure",
    "Health",
    "PlatformErrorBody",
    "ResolutionView",
    "printable",
    "request_field",
    "request_fingerprint",
]

# Bounds on what a client may send: generous for real data, small enough that nothing a client
# sends can make a row or a log line unreasonably large.
# Identifiers carry no C0/C1 control characters (NUL, CR/LF...), no line or paragraph
# separators and no invisible format characters (Unicode category Cf: bidirectional marks and
# overrides, zero-width characters, the BOM, tag characters): they reach Meta, logs and
# consoles, where such characters forge or hide text. (\Z, not $: $ accepts a trailing "\n".)
_FORBIDDEN = (
    "\x00-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f"
)
PRINTABLE = f"^[^{_FORBIDDEN}]*\\Z"
_IS_PRINTABLE = re.compile(PRINTABLE)


def printable(value: str) -> bool:
    """Whether ``value`` has none of the characters identifiers may not carry."""
    return _IS_PRINTABLE.match(value) is not None


def _text(max_length: int) -> msgspec.Meta:
    return msgspec.Meta(min_length=1, max_length=max_length, pattern=PRINTABLE)


# A conversion's text holds to PRINTABLE too (the schema says so), but it is checked after
# decoding (:func:`gateway.validation.decode_body`), and only when the body has anything but
# plain ASCII: msgspec runs a pattern through Python's re for every string, six calls a
# conversion, where the body's three byte scans clear the common case at once.
_CHECKED_AFTER_DECODING: dict[str, Any] = {"pattern": PRINTABLE}


def _conversion_text(max_length: int) -> msgspec.Meta:
    return msgspec.Meta(
        min_length=1, max_length=max_length, extra_json_schema=_CHECKED_AFTER_DECODING
    )


AccountId = Annotated[str, _text(128)]
EventId = Annotated[str, _text(256)]
# A conversion's value: up to a quadrillion (sums of many stay far inside a double).
Money = Annotated[float, msgspec.Meta(ge=0, le=1e15)]
ContentIds = Annotated[list[Annotated[str, _conversion_text(256)]], msgspec.Meta(max_length=1000)]
# A WhatsApp business-scoped user id: "US.13491208655302741918", parents "US.ENT.1181...".
Bsuid = Annotated[
    str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*\Z")
]


class WireStruct(
    msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True, kw_only=True
):
    """Base for everything on our own HTTP wire."""


class ConversionRequest(WireStruct, frozen=True):
    """``POST /v1/whatsapp/conversions``: one conversion event, Zernio's request shape.

    Decode it with :func:`gateway.read_json` (or ``gateway.validation.decode_body``): besides
    msgspec's checks, that holds its text fields to PRINTABLE, which msgspec alone does not.
    """

    account_id: Annotated[str, _conversion_text(128)]
    event_name: Annotated[str, _conversion_text(64)]
    event_id: Annotated[str, _conversion_text(256)]
    conversation_id: Annotated[str, _conversion_text(128)] | None = None
    phone_e164: Annotated[str, _conversion_text(32)] | None = None
    # Our extension (Zernio clients never send it): for users whose phone Meta withholds.
    business_scoped_user_id: Bsuid | None = None
    value: Money | None = None
    currency: Annotated[str, _conversion_text(16)] | None = None
    content_ids: ContentIds | None = None
    email: Annotated[str, _conversion_text(320)] | None = None
    external_id: Annotated[str, _conversion_text(256)] | None = None
    test_code: Annotated[str, _conversion_text(64)] | None = None
    # Unix seconds; a float is accepted (and floored) because Zernio's type is "number".
    event_time: float | None = None


_REQUEST_ATTRIBUTES = {f.encode_name: f.name for f in msgspec.structs.fields(ConversionRequest)}


def _checked_after_decoding(kind: type[msgspec.Struct]) -> tuple[tuple[str, str, bool], ...]:
    """(attribute, wire name, whether a list) of the fields of ``kind`` whose text is checked
    against PRINTABLE after decoding."""
    found = []
    for field in msgspec.inspect.type_info(kind).fields:  # type: ignore[attr-defined]
        kinds = getattr(field.type, "types", (field.type,))
        for one in kinds:
            item = getattr(one, "item_type", one)
            if getattr(item, "extra_json_schema", None) == _CHECKED_AFTER_DECODING:
                found.append((field.name, field.encode_name, item is not one))
    return tuple(found)


# The conversion's text fields that gateway.validation.decode_conversion checks.
CONVERSION_TEXT_FIELDS = _checked_after_decoding(ConversionRequest)


def request_field(request: ConversionRequest, name: str) -> object:
    """Return the value of a request field by its wire name (``phoneE164``), or None."""
    attribute = _REQUEST_ATTRIBUTES.get(name)
    return None if attribute is None else getattr(request, attribute)


def request_fingerprint(request: ConversionRequest) -> dict[str, str]:
    """Return a short checksum of each field sent, by wire name: enough to tell which fields
    of a reused ``eventId`` differ, without keeping the values (emails, phones) themselves.

    ``accountId`` and ``eventId`` are left out: they are the stored event's key, so a reuse
    always has the same. A CRC-32 in hex: telling a changed field from an unchanged one needs
    no cryptography (a change goes unnoticed once in four billion), and it costs a fraction of
    a digest, on every conversion.
    """
    encode = _FINGERPRINT.encode
    values = msgspec.structs.astuple(request)  # one call, not a getattr per field
    digests = {}
    for name, position in _FINGERPRINTED:
        value = values[position]
        if value is not None:
            digests[name] = "%08x" % zlib.crc32(encode(value))  # noqa: UP031  (faster here)
    return digests


def sha256_fingerprint(request: ConversionRequest) -> dict[str, str]:
    """The fingerprint events stored before version 0.7 carry: 16 hex digits of a SHA-256
    per field, the key fields included (a retry of one of them is compared with this)."""
    encode = _FINGERPRINT.encode
    return {
        name: hashlib.sha256(encode(getattr(request, attribute))).hexdigest()[:16]
        for name, attribute in _REQUEST_ATTRIBUTES.items()
        if getattr(request, attribute) is not None
    }


_FINGERPRINT = msgspec.json.Encoder()
# The fingerprinted fields that identify a person: an erasure keeps that they were sent, not
# their digests (ERASED_DIGEST in their place). What was bought, when and for how much stays,
# so a reused eventId is still told from a retry after the person is erased.
PERSONAL_FIELDS = frozenset({"phoneE164", "businessScopedUserId", "email", "externalId"})
ERASED_DIGEST = "erased"
# (wire name, position in the request's fields) of each field a fingerprint covers.
_FINGERPRINTED = tuple(
    (field.encode_name, position)
    for position, field in enumerate(msgspec.structs.fields(ConversionRequest))
    if field.encode_name not in {"accountId", "eventId"}
)


class Failure(WireStruct, frozen=True):
    event_index: int
    event_id: str
    message: str
    code: str


class DeliveryView(WireStruct, frozen=True):
    """One sink's state for one event."""

    sink: str
    status: str
    attempts: int = 0
    error: str | None = None
    trace_id: str | None = None


class ConversionResponse(WireStruct, frozen=True):
    """Zernio's answer shape, plus what the gateway did with the event."""

    platform: str
    events_received: int
    events_failed: int
    failures: list[Failure]
    trace_id: str | None
    event_id: str
    status: str
    duplicate: bool
    conversation_id: str
    deliveries: list[DeliveryView]
    # The click is older than Meta's attribution window: delivered, but it will not attribute.
    attribution_window_expired: bool
    # For dry runs: the exact request body that would be POSTed to Meta.
    payload: dict[str, Any] | None = None
    # How the conversation was found (resolver, field, the stored form that matched).
    resolution: ResolutionView | None = None


class ResolutionView(WireStruct, frozen=True, omit_defaults=True):
    """How the conversation was found: the resolver, the request field it used, which form of
    the identifier matched (``mexico_with_1``, ``former_number``, ``parent``...), and whether
    more than one person matched (the most recent with a click was taken)."""

    resolver: str
    field: str | None = None
    form: str | None = None
    ambiguous: bool = False


class EventSummary(WireStruct, frozen=True):
    """One row of ``GET /v1/whatsapp/conversions``."""

    timestamp: str
    event_name: str
    conversation_id: str
    events_received: int
    events_failed: int
    trace_id: str | None
    duration_ms: float
    event_id: str
    status: str
    attribution_window_expired: bool
    attempts: int
    error: str | None
    resolution: ResolutionView | None = None


class AttemptView(WireStruct, frozen=True):
    sink: str
    attempt: int
    at: str
    outcome: str
    http_status: int | None
    error_code: str | None
    message: str | None
    trace_id: str | None
    batch_size: int
    duration_ms: float


class DeliveryDetail(WireStruct, frozen=True):
    sink: str
    status: str
    attempts: int
    error: str | None
    error_code: str | None
    trace_id: str | None
    warnings: list[str] | None


class EventDetail(WireStruct, frozen=True):
    """``GET /v1/whatsapp/conversions/{eventId}``: one event with every attempt."""

    event_id: str
    account_id: str
    event_name: str
    conversation_id: str
    status: str
    timestamp: str
    event_time: int
    attribution_window_expired: bool
    deliveries: list[DeliveryDetail]
    attempts: list[AttemptView]
    # The Meta event as stored (hashed fields only).
    event: dict[str, Any]
    test_event_code: str | None
    resolution: ResolutionView | None = None


class EventList(WireStruct, frozen=True):
    events: list[EventSummary]


class ConversationMetadata(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The click a conversation carries, under Zernio's (snake_case) metadata keys."""

    ctwa_clid: str | None = None
    ctwa_captured_at: str | None = None
    ctwa_clicked_at: str | None = None
    ctwa_source_id: str | None = None
    ctwa_source_url: str | None = None
    ctwa_headline: str | None = None
    ctwa_source_type: str | None = None
    ctwa_capture_source: str | None = None


class ConversationView(WireStruct, frozen=True):
    """One conversation; its ``id`` is what ``conversationId`` takes."""

    id: str
    account_id: str
    # The phone as WhatsApp sends it; null while Meta withholds it (a user with a username).
    phone_e164: str | None
    business_scoped_user_id: str | None
    parent_business_scoped_user_id: str | None
    # The latest WhatsApp username, for display.
    username: str | None
    metadata: ConversationMetadata
    created_at: str
    last_inbound_at: str | None
    # The conversation that now receives this person's messages, if not this one.
    superseded_by: str | None = None


class ConversationList(WireStruct, frozen=True):
    conversations: list[ConversationView]


class ErrorBody(WireStruct, frozen=True):
    """Zernio's error envelope."""

    error: str
    type: str
    code: str
    param: str | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class PlatformErrorBody(ErrorBody, frozen=True):
    """The envelope for upstream failures: Meta's own error passed through."""

    platform: str = "metaads"
    platform_error: Any = None


class DatasetRequest(WireStruct, frozen=True):
    """``POST /v1/whatsapp/dataset``."""

    account_id: AccountId


class DatasetAnswer(msgspec.Struct, rename="camel", frozen=True, kw_only=True, omit_defaults=True):
    dataset_id: str | None
    created: bool | None = None


class ErasureCounts(msgspec.Struct, kw_only=True, rename="camel"):
    """How many rows of each kind an erasure touched (the answer and the audit row)."""

    conversations: int = 0
    aliases: int = 0
    webhook_messages: int = 0
    automatic_events: int = 0
    events_scrubbed: int = 0
    deliveries_cancelled: int = 0
    notifications_redacted: int = 0


class ErasureAnswer(WireStruct, frozen=True):
    """``DELETE /v1/whatsapp/users``: what was erased (counts only) and the audit row's id."""

    erasure_id: int
    erased: ErasureCounts
    suppressed: bool
    # The erased bytes have left the database file too (else a checkpoint is retried, in the
    # background, until they have).
    file_cleared: bool


class Health(WireStruct, frozen=True):
    """``GET /healthz`` and ``GET /readyz``."""

    status: str
    checks: dict[str, str] = msgspec.field(default_factory=dict)


CONVERSION_DECODER = msgspec.json.Decoder(ConversionRequest)
ENCODER = msgspec.json.Encoder()
