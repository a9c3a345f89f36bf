"""Every validation rule, through the real endpoint, with the error the caller reads."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import EventsConfig
from gateway.errors import InvalidRequest
from gateway.validation import (
    check_conversion,
    decode_body,
    decode_conversion,
    iso_currencies,
)
from gateway.wire import CONVERSION_TEXT_FIELDS, ConversionRequest, printable
from tests.conftest import AUTH, ClientFactory, add_conversation, store_of

Client = TestClient[web.Request, web.Application]
URL = "/v1/whatsapp/conversions"
NOW = time.time()


def body(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "accountId": "acme",
        "eventName": "LeadSubmitted",
        "eventId": "lead-1",
        "conversationId": "conv_x",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


CASES = [
    # (id, body, status code, param, words the message must contain)
    (
        "missing account",
        body(accountId=...),
        "missing_field",
        "accountId",
        "`accountId` is required",
    ),
    (
        "missing event name",
        body(eventName=...),
        "missing_field",
        "eventName",
        "`eventName` is required",
    ),
    ("missing event id", body(eventId=...), "missing_field", "eventId", "stable, unique id"),
    ("empty event id", body(eventId=""), "invalid_field", "eventId", "length >= 1"),
    ("long event id", body(eventId="x" * 257), "invalid_field", "eventId", "length <= 256"),
    ("unknown field", body(orderTotal=5), "unknown_field", "orderTotal", "accepted fields are"),
    (
        "snake case field",
        body(event_time=5),
        "unknown_field",
        "event_time",
        "Did you mean `eventTime`",
    ),
    (
        "wrong type",
        body(value="12"),
        "invalid_field",
        "value",
        "Expected `float | null`, got `str`",
    ),
    (
        "no conversation or phone",
        body(conversationId=...),
        "missing_conversation",
        "conversationId",
        "Send one of `conversationId`, `businessScopedUserId`, `phoneE164`",
    ),
    ("Lead", body(eventName="Lead"), "invalid_event_name", "eventName", "use `LeadSubmitted`"),
    (
        "custom name",
        body(eventName="BoughtStuff"),
        "invalid_event_name",
        "eventName",
        "use one of: LeadSubmitted, Purchase",
    ),
    ("bad currency", body(value=5, currency="ABC"), "invalid_currency", "currency", "ISO 4217"),
    ("currency XXX", body(value=5, currency="XXX"), "invalid_currency", "currency", "ISO 4217"),
    (
        "value without currency",
        body(value=5),
        "missing_currency",
        "currency",
        "required when `value`",
    ),
    (
        "purchase without value",
        body(eventName="Purchase", currency="USD"),
        "missing_field",
        "value",
        "required for Purchase",
    ),
    ("negative value", body(value=-1, currency="USD"), "invalid_field", "value", ">= 0"),
    (
        "milliseconds",
        body(eventTime=NOW * 1000),
        "event_time_milliseconds",
        "eventTime",
        "looks like milliseconds",
    ),
    ("future", body(eventTime=NOW + 3600), "event_time_in_future", "eventTime", "in the future"),
    (
        "too old",
        body(eventTime=NOW - 8 * 86400),
        "event_time_too_old",
        "eventTime",
        "older than 7 days",
    ),
    ("bad email", body(email="not-an-email"), "invalid_email", "email", "name@example.com"),
    (
        "short phone",
        body(conversationId=..., phoneE164="+1 555"),
        "invalid_phone",
        "phoneE164",
        "not a number that can exist",
    ),
    (
        "letters in phone",
        body(conversationId=..., phoneE164="+1 650 CALL NOW"),
        "invalid_phone",
        "phoneE164",
        "not a number that can exist",
    ),
    (
        "blank content id",
        body(contentIds=["a", "  "]),
        "invalid_content_id",
        "contentIds[1]",
        "blank",
    ),
    ("empty content id", body(contentIds=[""]), "invalid_field", "contentIds[0]", "length >= 1"),
    ("content ids not a list", body(contentIds="sku"), "invalid_field", "contentIds", "Expected"),
    ("long email", body(email="a" * 320 + "@x.io"), "invalid_field", "email", "length <= 320"),
    ("empty test code", body(testCode=""), "invalid_field", "testCode", "length >= 1"),
    ("blank event id", body(eventId="   "), "invalid_field", "eventId", "must not be blank"),
    ("blank external id", body(externalId=" "), "invalid_field", "externalId", "leave the field"),
    (
        "not even milliseconds",
        body(eventTime=1e23),
        "invalid_field",
        "eventTime",
        "not a Unix time; send seconds since 1970",
    ),
]


@pytest.mark.parametrize(
    ("payload", "code", "param", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_rule(
    client: Client, payload: dict[str, Any], code: str, param: str, words: str
) -> None:
    resp = await client.post(URL, json=payload, headers=AUTH)
    answer = await resp.json()
    assert resp.status == 400, answer
    assert answer["type"] == "invalid_request_error"
    assert answer["code"] == code
    assert answer["param"] == param
    assert words in answer["error"]


async def test_overflowing_value_is_400(client: Client) -> None:
    raw = b'{"accountId":"acme","eventName":"LeadSubmitted","eventId":"e","conversationId":"c",'
    raw += b'"value":1e999,"currency":"USD"}'
    resp = await client.post(URL, data=raw, headers={**AUTH, "Content-Type": "application/json"})
    answer = await resp.json()
    assert resp.status == 400
    assert answer["param"] == "value"
    assert "out of range" in answer["error"]


async def test_lead_error_lists_allowed_names(client: Client) -> None:
    resp = await client.post(URL, json=body(eventName="Lead"), headers=AUTH)
    answer = await resp.json()
    assert answer["details"]["allowed"] == [
        "LeadSubmitted",
        "Purchase",
        "AddToCart",
        "InitiateCheckout",
        "ViewContent",
    ]


async def test_allowlist_is_configurable(make_client: ClientFactory) -> None:
    client = await make_client(events={"allowed_names": ["LeadSubmitted", "QualifiedLead"]})
    conversation = await add_conversation(store_of(client))
    ok = await client.post(
        URL, json=body(eventName="QualifiedLead", conversationId=conversation.id), headers=AUTH
    )
    assert ok.status == 200, await ok.text()
    refused = await client.post(
        URL,
        json=body(eventName="Purchase", eventId="p", conversationId=conversation.id),
        headers=AUTH,
    )
    assert (await refused.json())["code"] == "invalid_event_name"


@pytest.mark.parametrize(
    "fields",
    [
        {"phoneE164": "+44 7911-123456", "conversationId": ...},
        {"phoneE164": "447911123456", "conversationId": ...},
        {"email": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
        {"value": 0, "currency": "brl"},
        {"eventTime": NOW - 6 * 86400},
        {"eventTime": NOW + 60},
        {"eventTime": int(NOW)},
    ],
    ids=[
        "phone with separators",
        "phone digits",
        "hashed email",
        "zero value",
        "6 days old",
        "small skew",
        "integer time",
    ],
)
async def test_accepted(client: Client, fields: dict[str, Any]) -> None:
    conversation = await add_conversation(store_of(client), wa_id="447911123456")
    payload = body(conversationId=conversation.id)
    payload.update(fields)
    payload = {k: v for k, v in payload.items() if v is not ...}
    resp = await client.post(URL, json=payload, headers=AUTH)
    assert resp.status == 200, await resp.text()


def test_future_skew_is_configurable() -> None:
    request = ConversionRequest(
        account_id="a",
        event_name="LeadSubmitted",
        event_id="e",
        conversation_id="c",
        event_time=1_000_100.0,
    )
    check_conversion(request, EventsConfig(max_future_skew_s=100), now=1_000_000.0)
    with pytest.raises(InvalidRequest, match="in the future"):
        check_conversion(request, EventsConfig(max_future_skew_s=99), now=1_000_000.0)


def test_currency_list_is_iso_4217() -> None:
    codes = iso_currencies()
    assert {"USD", "EUR", "BRL", "INR", "JPY", "MXN"} <= codes
    assert "XXX" not in codes
    assert "ABC" not in codes


def test_text_python_calls_printable_is_text_identifiers_may_carry() -> None:
    # decode_conversion lets a string through on str.isprintable() before asking PRINTABLE:
    # that is only sound while no character passes the first and fails the second.
    leaks = [
        hex(code)
        for code in range(sys.maxunicode + 1)
        if chr(code).isprintable() and not printable(chr(code))
    ]
    assert leaks == []


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"eventId": "del\x7fete"}, "eventId"),  # plain ASCII, but DEL
        ({"accountId": "acme\u200b"}, "accountId"),  # zero-width space, raw UTF-8
        ({"contentIds": ["ok", "sku\u2028"]}, "contentIds[1]"),
        ({"email": "a@b.co\u0085"}, "email"),  # C1 control, non-ASCII UTF-8
    ],
)
def test_text_checked_after_decoding_names_the_field(fields: dict[str, Any], param: str) -> None:
    # As sent raw (UTF-8, or ASCII with a DEL), and as \u escapes in a plain ASCII body.
    for raw in (
        json.dumps(body(**fields), ensure_ascii=False).encode(),
        json.dumps(body(**fields)).encode(),
    ):
        with pytest.raises(InvalidRequest) as caught:
            decode_conversion(raw)
        assert (caught.value.code, caught.value.param) == ("invalid_field", param)
        assert "control character" in caught.value.message


def test_every_text_field_of_a_conversion_is_checked() -> None:
    text = {name for _, name, _ in CONVERSION_TEXT_FIELDS}
    strings = {
        f.encode_name
        for f in msgspec.structs.fields(ConversionRequest)
        if "str" in str(f.type) and f.encode_name != "businessScopedUserId"  # its own pattern
    }
    assert text == strings
    # Text that only looks odd is fine: a non-breaking space, accents, emoji.
    request = decode_conversion(
        json.dumps(body(eventId="caf\u00e9\u00a0\U0001f600"), ensure_ascii=False).encode()
    )
    assert request.event_id == "caf\u00e9\u00a0\U0001f600"


def test_any_decoder_of_a_conversion_checks_its_text() -> None:
    # A plugin's route decodes with a decoder of its own (gateway.read_json): the text check
    # is decode_body's, not only decode_conversion's.
    raw = json.dumps(body(eventId="id\u202etxt")).encode()
    with pytest.raises(InvalidRequest) as caught:
        decode_body(raw, msgspec.json.Decoder(ConversionRequest))
    assert (caught.value.code, caught.value.param) == ("invalid_field", "eventId")


async def test_a_content_type_it_cannot_read_is_quoted_as_sent(client: Client) -> None:
    headers = {**AUTH, "Content-Type": "application/json, text/plain"}
    resp = await client.post(URL, data=b"{}", headers=headers)
    answer = await resp.json()
    assert (resp.status, answer["param"]) == (415, "Content-Type")
    assert "got 'application/json, text/plain'" in answer["error"]


async def test_a_value_not_among_a_fields_choices_lists_them(client: Client) -> None:
    replay = {"accountId": "acme", "status": ["delivered"]}
    resp = await client.post("/v1/whatsapp/replay", json=replay, headers=AUTH)
    answer = await resp.json()
    assert (resp.status, answer["param"]) == (400, "status[0]")
    assert "'delivered' is not one of expired, failed" in answer["error"]
    assert answer["details"] == {"allowed": ["expired", "failed"]}
    # In the query string too.
    query = {"accountId": "acme", "status": "sent"}
    resp = await client.get(URL, params=query, headers=AUTH)
    answer = await resp.json()
    assert (resp.status, answer["param"]) == (400, "status")
    assert "'sent' is not one of delivered, dry_run, expired, failed, pending" in answer["error"]
    # A body that is not an object says which fields the endpoint takes.
    resp = await client.post("/v1/whatsapp/replay", json=[], headers=AUTH)
    answer = await resp.json()
    assert (resp.status, answer["code"]) == (400, "invalid_body")
    assert "`accountId`" in answer["error"]
    assert "conversion" not in answer["error"]
