"""Turn a request body into a checked :class:`ConversionRequest`, or a 400 that says how to fix it.

Structural rules (types, lengths, unknown fields) live in the Structs of :mod:`gateway.wire`;
the rules that need configuration or a clock (event allowlist, time window) live here. msgspec's
messages can quote the rejected value, so they go back to the client who sent it but only the
field path is logged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import cache
from typing import Any, TypeVar

import msgspec
import pycountry

from gateway.config import EventsConfig
from gateway.errors import InvalidRequest
from gateway.hashing import is_sha256_hex, normalize_email
from gateway.phones import invalid_phone, phone_digits
from gateway.wire import (
    CONVERSION_DECODER,
    CONVERSION_TEXT_FIELDS,
    ConversionRequest,
    printable,
)

__all__ = [
    "check_conversion",
    "choice_error",
    "decode_body",
    "decode_conversion",
    "iso_currencies",
    "pattern_error",
    "validation_error",
]

T = TypeVar("T")

# Event names Meta refuses for business messaging (subcode 2804066) with what to send instead.
_REPLACEMENTS = {"Lead": "LeadSubmitted", "CompleteRegistration": "LeadSubmitted"}

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
# Anything this large is a millisecond (or microsecond) timestamp: 1e11 s is the year 5138.
_MILLISECONDS_FLOOR = 100_000_000_000

_FIELD_HINTS = {
    "accountId": "Send the id of an account from the gateway's [[accounts]] config.",
    "eventName": "Send one of the allowed event names, e.g. Purchase or LeadSubmitted.",
    "eventId": "Send a stable, unique id for this conversion (1-256 characters); it deduplicates.",
    "conversationId": "Send a conversation id the gateway returned (1-128 characters).",
    "phoneE164": "Send the phone number with its country code, e.g. +1 650 555 1234.",
    "businessScopedUserId": "Send the WhatsApp business-scoped user id as Meta sent it, e.g."
    " US.13491208655302741918 (letters, digits and dots, no spaces).",
    "value": "Send a finite, non-negative number, e.g. 49.99.",
    "currency": "Send a 3-letter ISO 4217 code, e.g. USD.",
    "contentIds": "Send a list of non-empty product id strings (at most 1000).",
    "email": "Send the customer's email address (at most 320 characters).",
    "externalId": "Send your customer id as a string (1-256 characters).",
    "testCode": "Send the test event code from Events Manager, e.g. TEST12345.",
    "eventTime": "Send Unix time in seconds, e.g. 1764000000.",
}
_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_NAMED = re.compile(r"`(?P<name>[^`]+)`")


@cache
def iso_currencies() -> frozenset[str]:
    """Return the active ISO 4217 codes (pycountry's maintained list), minus the no-money ones."""
    # XXX means "no currency" and XTS is reserved for testing: neither is a conversion value.
    return frozenset(c.alpha_3 for c in pycountry.currencies) - {"XXX", "XTS"}


def validation_error(
    exc: msgspec.ValidationError,
    accepted: Sequence[str] = tuple(_FIELD_HINTS),
    kind: object = None,
) -> InvalidRequest:
    """Translate a msgspec error into an :class:`InvalidRequest` naming the field.

    ``accepted``: the body's fields, for the hint on an unknown one; ``kind``: the Struct it
    was decoded as, for the values a field of fixed choices takes.
    """
    text = str(exc)
    match = _PATH.match(text)
    assert match is not None  # the pattern matches any string
    msg, path = match["msg"], (match["path"] or "").lstrip(".")
    param: str | None = path or None
    if msg.startswith(("Object missing required field", "Object contains unknown field")):
        named = _NAMED.search(msg)
        if named:
            param = f"{path}.{named['name']}" if path else named["name"]
    if param is None:
        some = ", ".join(f"`{name}`" for name in accepted[:3])
        return InvalidRequest(
            f"The body must be one JSON object of this endpoint's fields ({some}...): {msg}.",
            code="invalid_body",
        )
    top = _top(param)
    if msg.startswith("Object contains unknown field"):
        camel = _camel(top)
        hint = (
            f"Did you mean `{camel}`? Fields are camelCase."
            if camel in accepted and camel != top
            else f"Remove it; accepted fields are: {', '.join(accepted)}."
        )
        return InvalidRequest(f"Unknown field `{param}`. {hint}", code="unknown_field", param=param)
    if msg.startswith("Object missing required field"):
        return InvalidRequest(
            f"`{param}` is required. {_FIELD_HINTS.get(top, '')}".strip(),
            code="missing_field",
            param=param,
        )
    worded = pattern_error(param, msg, _FIELD_HINTS.get(top, "")) or choice_error(param, msg, kind)
    if worded is not None:
        return worded
    return InvalidRequest(
        f"Invalid `{param}`: {msg}. {_FIELD_HINTS.get(top, '')}".strip(),
        code="invalid_field",
        param=param,
    )


def _top(param: str) -> str:
    """The top-level field of a path (``contentIds`` of ``contentIds[1]``)."""
    return re.split(r"[.\[]", param, maxsplit=1)[0]


def _unprintable(param: str) -> InvalidRequest:
    top = _top(param)
    return InvalidRequest(
        f"Invalid `{param}`: {_UNPRINTABLE} {_FIELD_HINTS.get(top, '')}".strip(),
        code="invalid_field",
        param=param,
    )


_UNPRINTABLE = (
    "it contains a control character (NUL, CR, LF, tab...) or an invisible one (zero-width,"
    " bidirectional marks and overrides, line separators); remove it."
)


def choice_error(param: str, msg: str, kind: object) -> InvalidRequest | None:
    """The 400 for a value that is not one of its field's choices, listing them (msgspec's
    message names only the value); None for any other kind of failure."""
    if kind is None or not msg.startswith("Invalid enum value"):
        return None
    top = _top(param)
    choices = _choices(kind).get(top)
    if not choices:
        return None
    return InvalidRequest(
        f"Invalid `{param}`: {msg.removeprefix('Invalid enum value ')} is not one of"
        f" {', '.join(choices)}.",
        code="invalid_field",
        param=param,
        details={"allowed": list(choices)},
    )


@cache
def _choices(kind: object) -> dict[str, tuple[str, ...]]:
    """Each field of fixed choices (a Literal, or a list of one) of the Struct ``kind``, by
    its wire name."""
    info = msgspec.inspect.type_info(kind)
    return {
        field.encode_name: values
        for field in getattr(info, "fields", ())
        if (values := _literals(field.type))
    }


def _literals(info: msgspec.inspect.Type) -> tuple[str, ...]:
    if isinstance(info, msgspec.inspect.LiteralType):
        return tuple(str(v) for v in info.values)
    if isinstance(info, msgspec.inspect.UnionType):
        return tuple(v for one in info.types for v in _literals(one))
    if isinstance(info, msgspec.inspect.ListType | msgspec.inspect.SetType):
        return _literals(info.item_type)
    return ()


def pattern_error(param: str, msg: str, hint: str) -> InvalidRequest | None:
    """The 400 for a value its field's pattern refused, said in words (msgspec's message
    quotes the pattern: hundreds of characters of escapes), with ``hint``; None for any other
    kind of failure."""
    if "matching regex" not in msg:
        return None
    # PRINTABLE's pattern (every identifier's), or a format's (a BSUID's).
    what = _UNPRINTABLE if "\\x00-\\x1f" in msg else "it has characters this field does not take."
    return InvalidRequest(
        f"Invalid `{param}`: {what} {hint}".strip(), code="invalid_field", param=param
    )


def decode_conversion(body: bytes) -> ConversionRequest:
    """Decode the JSON body into a :class:`ConversionRequest` or raise a 400."""
    return decode_body(body, CONVERSION_DECODER)


def _check_text(request: ConversionRequest) -> None:
    """Raise a 400 for the first text field holding a character identifiers may not carry."""
    for attribute, name, is_list in CONVERSION_TEXT_FIELDS:
        value = getattr(request, attribute)
        if value is None:
            continue
        for i, text in enumerate(value) if is_list else [(None, value)]:
            if not (text.isprintable() or printable(text)):
                raise _unprintable(name if i is None else f"{name}[{i}]")


def _field_names(kind: Any) -> tuple[str, ...]:
    """Return a Struct's wire field names (the conversion's for anything else)."""
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return tuple(f.encode_name for f in msgspec.structs.fields(kind))
    return tuple(_FIELD_HINTS)


def decode_body(body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode a JSON request body with ``decoder`` or raise a 400 naming the field."""
    try:
        value = decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise validation_error(exc, _field_names(decoder.type), decoder.type) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError (not a DecodeError) for invalid UTF-8 in strings.
        raise InvalidRequest(
            f"The body is not valid JSON ({exc}). Send one JSON object, UTF-8 encoded.",
            code="invalid_json",
        ) from None
    # A conversion's text is checked here rather than by msgspec (wire._conversion_text),
    # for every decoder of one (plugins' read_json too). Plain ASCII without escapes or DEL
    # (raw control bytes are not JSON) cannot decode to a character PRINTABLE forbids: the
    # usual body skips the check. (find, not `in`: bytes' `in` first tries its argument as an
    # int and formats a TypeError.)
    if isinstance(value, ConversionRequest) and (
        not body.isascii() or body.find(b"\\") >= 0 or body.find(b"\x7f") >= 0
    ):
        _check_text(value)
    return value


def check_conversion(request: ConversionRequest, events: EventsConfig, *, now: float) -> None:
    """Apply the rules a Struct cannot express; raise :class:`InvalidRequest` on the first."""
    # Which identifiers a request needs is the resolvers' business (the pipeline asks them).
    _check_event_name(request.event_name, events.allowed_names)
    if request.phone_e164 is not None and phone_digits(request.phone_e164) is None:
        raise invalid_phone()
    if request.value is not None and not math.isfinite(request.value):
        raise InvalidRequest(
            "Invalid `value`: must be a finite number.", code="invalid_value", param="value"
        )
    _check_money(request)
    if request.email is not None:
        # The normalization hashing applies: what passes here as a digest is sent as one.
        email = normalize_email(request.email)
        if not (is_sha256_hex(email) or _EMAIL.match(email)):
            raise InvalidRequest(
                "Invalid `email`: expected an address like name@example.com (or its SHA-256"
                " hex digest).",
                code="invalid_email",
                param="email",
            )
    for i, content_id in enumerate(request.content_ids or ()):
        if not content_id.strip():
            raise InvalidRequest(
                f"Invalid `contentIds[{i}]`: product ids must not be blank.",
                code="invalid_content_id",
                param=f"contentIds[{i}]",
            )
    if not request.event_id.strip():
        raise InvalidRequest(
            "Invalid `eventId`: must not be blank; send one id per conversion, e.g. order-1234"
            " (Meta deduplicates by it).",
            code="invalid_field",
            param="eventId",
        )
    if request.external_id is not None and not request.external_id.strip():
        raise InvalidRequest(
            "Invalid `externalId`: must not be blank; send your customer id, or leave the field"
            " out.",
            code="invalid_field",
            param="externalId",
        )
    if request.event_time is not None:
        _check_event_time(request.event_time, events, now=now)


def _check_event_name(name: str, allowed: list[str]) -> None:
    if name in allowed:
        return
    replacement = _REPLACEMENTS.get(name)
    if replacement is not None and replacement in allowed:
        message = (
            f"Meta rejects `{name}` for business messaging (subcode 2804066); use"
            f" `{replacement}` for leads."
        )
    else:
        message = f"`eventName` {name!r} is not allowed; use one of: {', '.join(allowed)}."
    raise InvalidRequest(
        message, code="invalid_event_name", param="eventName", details={"allowed": list(allowed)}
    )


def _check_money(request: ConversionRequest) -> None:
    currency = request.currency
    if currency is not None and currency.strip().upper() not in iso_currencies():
        raise InvalidRequest(
            f"Invalid `currency` {currency!r}: expected an ISO 4217 code such as USD, EUR or BRL.",
            code="invalid_currency",
            param="currency",
        )
    if request.value is not None and currency is None:
        raise InvalidRequest(
            "`currency` is required when `value` is sent: Meta cannot read a value without it.",
            code="missing_currency",
            param="currency",
        )
    if request.event_name == "Purchase" and (request.value is None or currency is None):
        missing = "value" if request.value is None else "currency"
        raise InvalidRequest(
            f"`{missing}` is required for Purchase events: Meta needs both value and currency.",
            code="missing_field",
            param=missing,
        )


def _check_event_time(event_time: float, events: EventsConfig, *, now: float) -> None:
    if event_time >= _MILLISECONDS_FLOOR * 1000:
        # Not even milliseconds: dividing by 1000 would not give a time either.
        raise InvalidRequest(
            f"Invalid `eventTime`: not a Unix time; send seconds since 1970, e.g. {int(now)}.",
            code="invalid_field",
            param="eventTime",
        )
    if event_time >= _MILLISECONDS_FLOOR:
        raise InvalidRequest(
            f"Invalid `eventTime` {event_time:.0f}: this looks like milliseconds; send Unix"
            f" seconds (divide by 1000, e.g. {int(event_time // 1000)}).",
            code="event_time_milliseconds",
            param="eventTime",
        )
    if event_time > now + events.max_future_skew_s:
        raise InvalidRequest(
            f"Invalid `eventTime`: {event_time - now:.0f} s in the future (allowed skew"
            f" {events.max_future_skew_s} s). Send the time the conversion happened, or omit"
            " it to use now.",
            code="event_time_in_future",
            param="eventTime",
        )
    if event_time < now - events.max_age_s:
        raise InvalidRequest(
            f"Invalid `eventTime`: older than {events.max_age_s // 86400} days; Meta rejects"
            " the whole request for such events (subcode 2804003). Only recent conversions can"
            " be reported.",
            code="event_time_too_old",
            param="eventTime",
        )


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)
