"""Meta's customer-information rules against Meta's published examples."""

from __future__ import annotations

import hashlib

import pytest

from gateway.hashing import (
    hash_email,
    hash_external_id,
    hash_phone,
    is_sha256_hex,
    normalize_email,
    normalize_phone,
)

JOHN = "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
PHONE = "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"


@pytest.mark.parametrize(
    "email", ["John_Smith@gmail.com", "  john_smith@gmail.com", "JOHN_SMITH@GMAIL.COM\n"]
)
def test_email_matches_metas_example(email: str) -> None:
    assert normalize_email(email) == "john_smith@gmail.com"
    assert hash_email(email) == JOHN


def test_phone_matches_metas_example() -> None:
    assert normalize_phone("+1 (650) 555-1212") == "16505551212"
    assert hash_phone("+1 (650) 555-1212") == PHONE


@pytest.mark.parametrize(
    ("raw", "digits"),
    [
        ("16505551212", "16505551212"),
        ("+44 7911-123456", "447911123456"),
        ("0016505551212", "16505551212"),
        ("+55 11 91234.5678", "5511912345678"),
    ],
)
def test_phone_digits(raw: str, digits: str) -> None:
    assert normalize_phone(raw) == digits


@pytest.mark.parametrize("raw", ["1234567", "1" * 16, "+1 650 CALL", "", "١٢٣٤٥٦٧٨٩"])
def test_implausible_phones(raw: str) -> None:
    assert normalize_phone(raw) is None


def test_external_id_is_lowercased_then_hashed() -> None:
    assert hash_external_id("CUST-42") == hashlib.sha256(b"cust-42").hexdigest()


def test_existing_digests_pass_through_unchanged() -> None:
    assert hash_email(JOHN) == JOHN
    assert hash_phone(PHONE) == PHONE
    assert hash_external_id(JOHN) == JOHN
    # A digest in upper case or with spaces is still a digest: sent in Meta's form, never
    # hashed a second time (Meta could not match a hash of a hash).
    assert not is_sha256_hex(JOHN.upper())
    for sent in (JOHN.upper(), f"  {JOHN}  ", f" {JOHN.upper()}\n"):
        assert hash_email(sent) == hash_external_id(sent) == JOHN
    assert hash_phone(f" {PHONE.upper()} ") == PHONE
