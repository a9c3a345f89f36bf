"""No double hashing: whatever form a client sends, Meta gets its normalization of the original.

Hypothesis sends emails and pre-hashed values, with any surrounding spaces and any case, through
a real gateway; the ``em`` and ``external_id`` it would send are checked against an oracle
written here from Meta's rules, and the oracle against Meta's published examples (META.md §2).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from itertools import cycle
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import API_KEY, Live, request
from tests.payloads import encode, message, messages_change, notification, referral, signed

EXAMPLES = 120
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def oracle_email(original: str) -> str:
    """Meta's table: trim, lowercase, SHA-256 as lowercase hex."""
    return hashlib.sha256(original.strip().lower().encode("utf-8")).hexdigest()


def oracle_external_id(original: str) -> str:
    return hashlib.sha256(original.lower().encode("utf-8")).hexdigest()


def test_the_oracle_matches_metas_published_example() -> None:
    assert oracle_email("John_Smith@gmail.com") == (
        "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
    )


@pytest.fixture(scope="module")
def conversation_id(live: Live) -> str:
    body = encode(
        notification(messages_change([message("16505550777", "wamid.hash", ref=referral("h"))]))
    )
    status, _ = request(live, "POST", "/webhooks/whatsapp", body, signed(body))
    assert status == 200
    status, answer = request(
        live, "GET", "/v1/whatsapp/conversations?accountId=acme", None,
        {"Authorization": f"Bearer {API_KEY}"},
    )  # fmt: skip
    conversation: str = json.loads(answer)["conversations"][0]["id"]
    return conversation


def user_data(live: Live, conversation_id: str, **fields: str) -> dict[str, Any]:
    body = {"accountId": "acme", "eventName": "LeadSubmitted", "eventId": uuid.uuid4().hex,
            "conversationId": conversation_id, **fields}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    status, answer = request(
        live, "POST", "/v1/whatsapp/conversions", json.dumps(body).encode(), headers
    )
    assert status == 200, answer
    data: dict[str, Any] = json.loads(answer)["payload"]["data"][0]["user_data"]
    return data


spaces = st.text(alphabet=" ", max_size=3)


def any_case(text: str, flips: list[bool]) -> str:
    return "".join(c.upper() if flip else c.lower() for c, flip in zip(text, cycle(flips)))


@FUZZ
@given(email=st.emails(), flips=st.lists(st.booleans(), min_size=1), pad=st.tuples(spaces, spaces))
def test_any_email_is_sent_as_metas_hash_of_it(
    live: Live, conversation_id: str, email: str, flips: list[bool], pad: tuple[str, str]
) -> None:
    sent = pad[0] + any_case(email, flips) + pad[1]
    assert user_data(live, conversation_id, email=sent)["em"] == oracle_email(email)


@FUZZ
@given(
    original=st.emails(),
    flips=st.lists(st.booleans(), min_size=1),
    pad=st.tuples(spaces, spaces),
)
def test_a_pre_hashed_email_is_sent_as_is_whatever_its_spaces_and_case(
    live: Live, conversation_id: str, original: str, flips: list[bool], pad: tuple[str, str]
) -> None:
    digest = oracle_email(original)
    sent = pad[0] + any_case(digest, flips) + pad[1]
    assert user_data(live, conversation_id, email=sent)["em"] == digest


@FUZZ
@given(
    original=st.text(
        alphabet=st.characters(blacklist_categories=["Cc", "Cs", "Zl", "Zp", "Cf"]), min_size=1
    ).filter(lambda t: t.strip()),
    hashed=st.booleans(),
    flips=st.lists(st.booleans(), min_size=1),
    pad=st.tuples(spaces, spaces),
)
def test_external_ids_are_hashed_once(
    live: Live,
    conversation_id: str,
    original: str,
    hashed: bool,
    flips: list[bool],
    pad: tuple[str, str],
) -> None:
    if hashed:
        digest = oracle_external_id(original)
        sent = pad[0] + any_case(digest, flips) + pad[1]
        assert user_data(live, conversation_id, externalId=sent)["external_id"] == digest
    else:
        sent = original[:256]
        expected = oracle_external_id(sent)
        if len(sent.strip()) == 64 and all(c in "0123456789abcdefABCDEF" for c in sent.strip()):
            expected = sent.strip().lower()  # it is a digest already
        assert user_data(live, conversation_id, externalId=sent)["external_id"] == expected
