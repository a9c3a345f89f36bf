"""Meta's customer-information rules: normalize, then SHA-256 (lowercase hex).

Shared by validation (is this plausibly an email?), the resolvers (phone digits) and the
normalizer plugins (what goes into ``user_data``), so every part applies the same rule.
"""

from __future__ import annotations

import hashlib
import hmac
import re

__all__ = [
    "hash_email",
    "hash_external_id",
    "hash_phone",
    "is_sha256_hex",
    "keyed_digest",
    "normalize_email",
    "normalize_phone",
    "sha256_hex",
]

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# Separators people type in phone numbers; anything else (letters) makes the number invalid.
_PHONE_SEPARATORS = re.compile(r"[\s\-().]")


def keyed_digest(key: bytes, kind: str, value: str) -> str:
    """Return HMAC-SHA256 of ``kind:value`` under ``key``, hex: what a suppression is stored
    as, so nobody without the key can match it against a list of phone numbers."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def sha256_hex(value: str) -> str:
    """Return the lowercase hex SHA-256 of ``value`` encoded as UTF-8."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def is_sha256_hex(value: str) -> bool:
    """Tell whether ``value`` already is a SHA-256 digest as Meta expects it."""
    return _SHA256_HEX.match(value) is not None


def normalize_email(value: str) -> str:
    """Trim and lowercase, per Meta's table (``John_Smith@gmail.com`` -> lowercase)."""
    return value.strip().lower()


def normalize_phone(value: str) -> str | None:
    """Return digits only with the country code, or ``None`` if it is not a plausible number.

    ``+``, spaces, dashes, dots and parentheses are tolerated and dropped; leading zeros are
    not a country code, so they are stripped as Meta's table says.
    """
    stripped = _PHONE_SEPARATORS.sub("", value.strip())
    stripped = stripped.removeprefix("+")
    if not stripped.isascii() or not stripped.isdigit():
        return None
    digits = stripped.lstrip("0")
    if not 8 <= len(digits) <= 15:
        return None
    return digits


def hash_email(value: str) -> str:
    """Return Meta's ``em``: SHA-256 of the normalized email, or the digest sent.

    Normalized first, whatever it is: a digest sent with spaces or in upper case is still a
    digest (validation judges the same normalized value), never hashed a second time.
    """
    email = normalize_email(value)
    return email if is_sha256_hex(email) else sha256_hex(email)


def hash_phone(value: str) -> str | None:
    """Return Meta's ``ph``: SHA-256 of the digits, or the digest sent."""
    digest = value.strip().lower()
    if is_sha256_hex(digest):
        return digest
    digits = normalize_phone(value)
    return None if digits is None else sha256_hex(digits)


def hash_external_id(value: str) -> str:
    """Return Meta's ``external_id``: SHA-256 of it lowercased, or the digest sent.

    A digest is recognised with surrounding spaces and in any case. An id is not trimmed:
    other channels (pixel, app events) hash the id as it is, and the same person must hash to
    the same value everywhere for Meta to match them.
    """
    digest = value.strip().lower()
    return digest if is_sha256_hex(digest) else sha256_hex(value.lower())
