"""Checking and bounding the values Meta sends: phones, times, display texts, nesting.

Each check returns None (or raises ValueError for a phone) instead of failing a notification:
the caller records the part as unprocessed with a reason.
"""

from __future__ import annotations

import math
import re

import msgspec

from gateway.capture.payload import MAX_TEXT, Contact, Referral

__all__ = [
    "MAX_DEPTH",
    "bounded_referral",
    "contact_phone",
    "display_text",
    "flatten_deep",
    "unix_seconds",
    "whatsapp_phone",
]

# Before WhatsApp existed: a timestamp this old is not Meta's.
_EARLIEST = 1_230_768_000.0  # 2009-01-01
# At or past this, a "Unix time" is milliseconds (1e11 s is the year 5138).
_MILLISECONDS = 1e11
_FUTURE_SKEW_S = 86400.0


def whatsapp_phone(value: str | None) -> str | None:
    """Return a WhatsApp phone id (digits, country code first), as Meta sends it."""
    if value is None or value == "":
        return None
    if value.isascii() and value.isdigit() and 6 <= len(value) <= 20:
        return value
    raise ValueError


def contact_phone(contact: Contact | None) -> str | None:
    """Return the contact's phone if it is one (a contact is auxiliary: never a reason to fail)."""
    try:
        return whatsapp_phone(contact.wa_id) if contact else None
    except ValueError:
        return None


def unix_seconds(value: object, now: float) -> float | None:
    """Return a plausible Unix time in seconds (milliseconds are converted), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and not (value.isascii() and value.replace(".", "", 1).isdigit()):
        return None
    if not isinstance(value, str | int | float):
        return None
    try:
        seconds = float(value)  # an int of 400 digits overflows
    except (OverflowError, ValueError):
        return None
    if not math.isfinite(seconds):
        return None
    if seconds >= _MILLISECONDS:
        seconds /= 1000.0
    if not _EARLIEST <= seconds <= now + _FUTURE_SKEW_S:
        return None
    return seconds


_JSON_STRUCTURE = re.compile(rb'[\\"\[\]{}]')


# Meta's notifications nest about 8 levels; deeper than this is not a notification's data.
MAX_DEPTH = 64


def flatten_deep(body: bytes, limit: int) -> bytes:
    """Return ``body`` with every array or object nested deeper than ``limit`` made ``null``.

    Iterative (the decoders recurse): a scan of the structural characters, minding strings
    and their escapes. Unbalanced input is returned as far as it goes; the decoder says why.
    """
    out = bytearray()
    copied = depth = 0
    in_string = escaped_until = 0
    start = -1
    for match in _JSON_STRUCTURE.finditer(body):
        at = match.start()
        char = body[at]
        if at < escaped_until:
            continue
        if char == 0x5C:  # backslash: the next byte is escaped (only inside strings)
            escaped_until = at + 2
            continue
        if char == 0x22:
            in_string ^= 1
            continue
        if in_string:
            continue
        if char in b"[{":
            depth += 1
            if depth == limit + 1:
                start = at
        else:
            if depth == limit + 1 and start >= 0:
                out += body[copied:start] + b"null"
                copied = at + 1
                start = -1
            depth -= 1
    out += body[copied:]
    return bytes(out)


def display_text(value: str | None, limit: int = MAX_TEXT) -> str | None:
    """A display text as one row may hold it: cut to ``limit``, without NUL characters
    (PostgreSQL's text cannot hold them; SQLite's rows are kept the same)."""
    return None if value is None else value.replace("\x00", "")[:limit]


def bounded_referral(referral: Referral) -> Referral:
    """Return ``referral`` with Meta's display texts cut to what one row may hold."""
    return msgspec.structs.replace(
        referral,
        source_url=display_text(referral.source_url),
        source_id=display_text(referral.source_id),
        source_type=display_text(referral.source_type),
        headline=display_text(referral.headline),
        body=display_text(referral.body),
        media_type=display_text(referral.media_type),
        ctwa_clid=referral.ctwa_clid or None,
    )
