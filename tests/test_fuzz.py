"""Hostile input against the real server: no input produces a 5xx or an unhandled exception.

A real gateway process (log sink) serves on loopback; hypothesis throws conversion requests,
webhook envelopes and raw bytes at it, and schemathesis walks every operation of its own
``/openapi.json``. The server's log is checked for unhandled errors at the end.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.http.signature import sign
from tests.conftest import API_KEY, APP_SECRET, Live, request
from tests.live import raw_http

EXAMPLES = int(os.environ.get("CTWA_FUZZ_EXAMPLES", "150"))


def check(status: int, body: bytes) -> None:
    assert status < 500, body[:500]
    if status >= 400:
        envelope = json.loads(body)
        assert {"error", "type", "code", "param", "details"} <= set(envelope)


leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_value = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
conversion = st.fixed_dictionaries(
    {},
    optional={
        "accountId": st.sampled_from(["acme", "other", "nope"]) | json_value,
        "eventName": st.sampled_from(["Purchase", "LeadSubmitted", "Lead", ""]) | json_value,
        "eventId": st.text(max_size=300) | json_value,
        "conversationId": st.text(max_size=200) | json_value,
        "phoneE164": st.sampled_from(["+1 650 555 1234", "12", "x"]) | st.text(max_size=40),
        "value": st.floats(allow_nan=False, allow_infinity=False) | json_value,
        "currency": st.sampled_from(["USD", "usd", "XXX", "ABCD"]) | json_value,
        "contentIds": st.lists(st.text(max_size=5), max_size=4) | json_value,
        "email": st.emails() | json_value,
        "externalId": json_value,
        "testCode": json_value,
        "eventTime": st.floats(allow_nan=False, allow_infinity=False) | st.integers() | json_value,
        "extraField": json_value,
    },
)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(body=conversion)
def test_conversion_bodies(live: Live, body: dict[str, Any]) -> None:
    live.cases["conversion"] = live.cases.get("conversion", 0) + 1
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    check(*request(live, "POST", "/v1/whatsapp/conversions", json.dumps(body).encode(), headers))


@FUZZ
@given(
    raw=st.binary(max_size=300),
    content_type=st.sampled_from(["application/json", "text/plain", ""]),
)
def test_raw_bytes(live: Live, raw: bytes, content_type: str) -> None:
    live.cases["raw"] = live.cases.get("raw", 0) + 1
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": content_type}
    check(*request(live, "POST", "/v1/whatsapp/conversions", raw, headers))


message = st.fixed_dictionaries(
    {"from": st.text(max_size=20), "id": st.text(max_size=30), "timestamp": st.text(max_size=12)},
    optional={
        "referral": st.dictionaries(
            st.sampled_from(["ctwa_clid", "source_id", "headline"]), json_value
        )
    },
)
envelope = st.fixed_dictionaries(
    {
        "object": st.sampled_from(["whatsapp_business_account", "page"]),
        "entry": st.lists(
            st.fixed_dictionaries(
                {
                    "id": st.sampled_from(["102290129340398", "1"]),
                    "changes": st.lists(
                        st.fixed_dictionaries(
                            {
                                "field": st.sampled_from(["messages", "automatic_events", "x"]),
                                "value": st.fixed_dictionaries(
                                    {},
                                    optional={
                                        "metadata": st.fixed_dictionaries(
                                            {
                                                "phone_number_id": st.sampled_from(
                                                    ["106540352242922", "9"]
                                                )
                                            }
                                        ),
                                        "messages": st.lists(message, max_size=3) | json_value,
                                        "statuses": st.lists(json_value, max_size=2),
                                        "automatic_events": st.lists(json_value, max_size=2),
                                    },
                                )
                                | json_value,
                            }
                        ),
                        max_size=3,
                    ),
                }
            ),
            max_size=3,
        ),
    }
)


@FUZZ
@given(payload=envelope | json_value)
def test_signed_webhook_bodies(live: Live, payload: Any) -> None:
    live.cases["webhook"] = live.cases.get("webhook", 0) + 1
    body = json.dumps(payload).encode()
    headers = {"X-Hub-Signature-256": sign(APP_SECRET.encode(), body)}
    check(*request(live, "POST", "/webhooks/whatsapp", body, headers))


def raw_request(live: Live, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    host, port = live.url.removeprefix("http://").split(":")
    status, _, answer = raw_http(host, int(port), head, body)
    return status, answer


# Header values: any bytes but CR and LF (those end the header), non-ASCII and controls included.
header_bytes = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
ROUTES = [
    ("GET", b"/v1/whatsapp/conversions"),
    ("GET", b"/v1/whatsapp/conversations"),
    ("GET", b"/v1/whatsapp/conversions/e1"),
    ("GET", b"/v1/whatsapp/dataset"),
    ("POST", b"/v1/whatsapp/conversions"),
    ("POST", b"/webhooks/whatsapp"),
    ("GET", b"/webhooks/whatsapp"),
    ("GET", b"/metrics"),
]


@FUZZ
@given(
    route=st.sampled_from(ROUTES),
    header=st.sampled_from(
        [b"Authorization", b"X-Request-Id", b"Content-Type", b"X-Hub-Signature-256"]
    ),
    prefix=st.sampled_from([b"", b"Bearer ", b"sha256=", b"application/json; charset="]),
    value=header_bytes,
    query=st.lists(
        st.tuples(
            st.sampled_from(
                [b"accountId", b"limit", b"phoneE164", b"businessScopedUserId", b"hub.mode",
                 b"hub.verify_token", b"hub.challenge", b"x"]
            ),
            st.binary(max_size=20).map(lambda b: urllib.parse.quote_from_bytes(b).encode())
            | st.sampled_from([b"%C2%B2", b"%FF%FE", b"%00", b"1e999", b"-0", b"%", b"%zz"]),
        ),
        max_size=4,
    ),
)  # fmt: skip
def test_hostile_headers_and_query_parameters(
    live: Live,
    route: tuple[str, bytes],
    header: bytes,
    prefix: bytes,
    value: bytes,
    query: list[tuple[bytes, bytes]],
) -> None:
    live.cases["headers"] = live.cases.get("headers", 0) + 1
    method, path = route
    target = path + (b"?" + b"&".join(k + b"=" + v for k, v in query) if query else b"")
    head = b"%s %s HTTP/1.1\r\nHost: fuzz\r\n%s: %s%s\r\n" % (
        method.encode(),
        target,
        header,
        prefix,
        value,
    )
    if header != b"Authorization":
        head += f"Authorization: Bearer {API_KEY}\r\n".encode()
    status, body = raw_request(live, head, b"{}" if method == "POST" else b"")
    assert status < 500, (head, body[:300])


def test_openapi_operations(live: Live) -> None:
    """Schemathesis: cases generated from our own OpenAPI document, for every operation."""
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, schemathesis.core.result.Ok), result
        operations.append(result.ok())
    assert len(operations) >= 10
    for operation in operations:

        @settings(max_examples=max(10, EXAMPLES // 5), deadline=None)
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            live.cases["openapi"] = live.cases.get("openapi", 0) + 1
            response = case.call(headers={"Authorization": f"Bearer {API_KEY}"})
            assert response.status_code < 500, (case.method, case.path, response.text[:500])

        run()
