"""Hostile review findings, each through the real app: no 500s, nothing silent, nothing leaked."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import ConversionRequest, EventDraft, hookimpl
from gateway.config import PluginsConfig, WebhookConfig
from gateway.console.forms import FORM_MAX_BYTES
from gateway.errors import ConfigError
from gateway.http.app import reload_secrets
from gateway.http.auth import client_address
from gateway.http.body import MAX_GZIP_MEMBERS
from tests.conftest import API_KEY, AUTH, ENV, ClientFactory, LogCapture, add_conversation, store_of
from tests.live import raw_http

# Run on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_ENGINES = True

Client = TestClient[web.Request, web.Application]


async def send(client: Client, head: bytes) -> tuple[int, bytes, dict[str, Any]]:
    """Send raw request bytes to the app behind ``client``; return status, head, JSON body."""
    host, port = client.server.host, client.server.port
    assert host is not None
    assert port is not None
    status, response_head, body = await asyncio.to_thread(raw_http, host, port, head)
    return status, response_head, json.loads(body)


async def test_a_non_ascii_bearer_token_is_401_with_an_envelope(client: Client) -> None:
    head = (
        b"GET /v1/whatsapp/conversions?accountId=acme HTTP/1.1\r\nHost: t\r\n"
        b"Authorization: Bearer \xff\xfe0123456789abcdef\r\n"
    )
    status, response_head, body = await send(client, head)
    assert (status, body["code"]) == (401, "invalid_api_key")
    assert b"X-Request-Id: " in response_head


async def test_a_non_ascii_metrics_key_is_401(make_client: ClientFactory) -> None:
    client = await make_client(metrics={"key_env": "CTWA_SCOPED_KEY"})
    head = b"GET /metrics HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer \xc3\x28\xff\r\n"
    status, _, body = await send(client, head)
    assert (status, body["code"]) == (401, "invalid_metrics_key")


async def test_a_superscript_limit_is_400_naming_it(client: Client, logs: LogCapture) -> None:
    head = (
        b"GET /v1/whatsapp/conversions?accountId=acme&limit=%C2%B2 HTTP/1.1\r\nHost: t\r\n"
        + f"Authorization: Bearer {API_KEY}\r\n".encode()
    )
    status, _, body = await send(client, head)
    assert (status, body["param"], body["code"]) == (400, "limit", "invalid_field")
    assert "whole number from 1 to 200" in body["error"]
    assert not logs.events("unhandled_error")


async def test_a_repeated_query_parameter_is_400(client: Client) -> None:
    head = (
        b"GET /v1/whatsapp/conversions?accountId=acme&accountId=other HTTP/1.1\r\nHost: t\r\n"
        + f"Authorization: Bearer {API_KEY}\r\n".encode()
    )
    status, _, body = await send(client, head)
    assert (status, body["param"]) == (400, "accountId")


async def test_the_server_header_names_no_versions(client: Client) -> None:
    for path in ("/healthz", "/nowhere"):
        resp = await client.get(path)
        assert resp.headers["Server"] == "ctwa-gateway"


@pytest.mark.parametrize("field", ["eventId", "email", "testCode", "externalId"])
@pytest.mark.parametrize("bad", ["NUL\x00", "line\r\nInjected: 1", "\u202etxt.exe", "tab\there"])
async def test_control_characters_in_identifiers_are_400(
    client: Client, field: str, bad: str
) -> None:
    body = {"accountId": "acme", "eventName": "Purchase", "eventId": "ctl-1",
            "conversationId": "conv_x", field: bad}  # fmt: skip
    resp = await client.post("/v1/whatsapp/conversions", json=body, headers=AUTH)
    answer = await resp.json()
    assert (resp.status, answer["param"]) == (400, field)
    assert "control character" in answer["error"]


@pytest.mark.parametrize(
    ("query", "param", "says"),
    [
        ("accountId=acme%00", "accountId", "control character"),
        ("accountId=acme&eventName=Purchase%E2%80%8B", "eventName", "control character"),
        ("accountId=acme&adId=%0A1", "adId", "control character"),
    ],
)
async def test_a_bad_character_in_a_query_parameter_is_named_in_words(
    client: Client, query: str, param: str, says: str
) -> None:
    resp = await client.get(f"/v1/whatsapp/conversions?{query}", headers=AUTH)
    answer = await resp.json()
    assert (resp.status, answer["param"]) == (400, param)
    assert says in answer["error"]
    # msgspec's message quotes the whole pattern; a person reads what is wrong instead.
    assert "regex" not in answer["error"]
    assert len(answer["error"]) < 300


async def test_a_bsuid_that_is_not_one_is_named_in_words(client: Client) -> None:
    resp = await client.get(
        "/v1/whatsapp/conversations",
        params={"accountId": "acme", "businessScopedUserId": "US.1 2"},
        headers=AUTH,
    )
    answer = await resp.json()
    assert (resp.status, answer["param"]) == (400, "businessScopedUserId")
    assert "regex" not in answer["error"]
    assert "US.13491208655302741918" in answer["error"]
    resp = await client.get(
        "/v1/whatsapp/conversations",
        params={"accountId": "acme", "businessScopedUserId": ""},
        headers=AUTH,
    )
    answer = await resp.json()
    assert (resp.status, answer["param"]) == (400, "businessScopedUserId")
    assert "is empty" in answer["error"]
    body = {"accountId": "acme", "eventName": "Purchase", "eventId": "b-1",
            "businessScopedUserId": "US.1 2"}  # fmt: skip
    resp = await client.post("/v1/whatsapp/conversions", json=body, headers=AUTH)
    answer = await resp.json()
    assert (resp.status, answer["param"]) == (400, "businessScopedUserId")
    assert "regex" not in answer["error"]


@pytest.mark.parametrize("path", [b"/webhooks/whatsapp", b"/v1/whatsapp/conversions"])
async def test_a_body_that_does_not_decompress_is_400(client: Client, path: bytes) -> None:
    assert client.server.host is not None
    assert client.server.port is not None
    head = (
        b"POST " + path + b" HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: gzip\r\n" + f"Authorization: Bearer {API_KEY}\r\n".encode()
    )
    status, _, body = await asyncio.to_thread(
        raw_http, client.server.host, client.server.port, head, b"not gzip at all"
    )
    answer = json.loads(body)
    assert (status, answer["code"], answer["param"]) == (400, "unreadable_body", "Content-Encoding")


@pytest.mark.parametrize(
    ("path", "content_type", "limit"),
    [
        ("/v1/whatsapp/conversions", "application/json", 1024 * 1024),
        ("/console/sign-in", "application/x-www-form-urlencoded", FORM_MAX_BYTES),
    ],
)
async def test_a_compressed_body_is_held_to_its_routes_limit(
    client: Client, path: str, content_type: str, limit: int
) -> None:
    # 9 KiB on the wire, 9 MiB inflated: past every route's limit, aiohttp's bound included.
    bomb = gzip.compress(b"a" * (9 << 20))
    headers = {**AUTH, "Content-Type": content_type, "Content-Encoding": "gzip"}
    resp = await client.post(path, data=bomb, headers=headers)
    answer = await resp.json()
    assert (resp.status, answer["code"]) == (413, "payload_too_large")
    assert answer["details"]["maxBodyBytes"] == limit
    assert str(limit) in answer["error"]


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def _two_members(data: bytes) -> bytes:
    return gzip.compress(data[:10]) + gzip.compress(data[10:])


@pytest.mark.parametrize(
    ("encoding", "pack"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("gzip", _two_members),
        ("deflate", zlib.compress),
        ("deflate", _raw_deflate),
        ("identity", bytes),
        ("", bytes),
    ],
    ids=["gzip", "x-gzip", "gzip members", "deflate", "raw deflate", "identity", "empty"],
)
async def test_a_compressed_conversion_is_read_like_a_plain_one(
    client: Client, encoding: str, pack: Callable[[bytes], bytes]
) -> None:
    conversation = await add_conversation(store_of(client))
    fields = {"accountId": "acme", "eventName": "Purchase", "eventId": f"gz-{encoding}",
              "conversationId": conversation.id, "value": 5, "currency": "USD"}  # fmt: skip
    body = json.dumps(fields)
    headers = {**AUTH, "Content-Type": "application/json", "Content-Encoding": encoding}
    resp = await client.post("/v1/whatsapp/conversions", data=pack(body.encode()), headers=headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["eventId"] == f"gz-{encoding}"


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
async def test_a_content_encoding_it_does_not_take_is_415_in_the_envelope(
    client: Client, encoding: str
) -> None:
    # aiohttp's own parser answered br and zstd in plain text, asking to install Brotli.
    headers = {**AUTH, "Content-Type": "application/json", "Content-Encoding": encoding}
    resp = await client.post("/v1/whatsapp/conversions", data=b"x", headers=headers)
    answer = await resp.json()
    assert (resp.status, answer["code"]) == (415, "unsupported_content_encoding")
    assert answer["param"] == "Content-Encoding"
    assert "gzip or deflate" in answer["error"]


@pytest.mark.parametrize("after", [b"", b"junk after the stream"], ids=["cut short", "junk"])
async def test_a_gzip_body_cut_short_or_followed_by_junk_is_400(
    client: Client, after: bytes
) -> None:
    whole = gzip.compress(b'{"accountId": "acme", "eventName": "Purchase"}')
    sent = whole + after if after else whole[:-6]
    headers = {**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    resp = await client.post("/v1/whatsapp/conversions", data=sent, headers=headers)
    answer = await resp.json()
    assert (resp.status, answer["code"], answer["param"]) == (
        400,
        "unreadable_body",
        "Content-Encoding",
    )


async def test_a_body_of_many_gzip_members_is_refused_before_it_costs_the_loop(
    client: Client,
) -> None:
    # Unsigned: 50,000 empty gzip members (20 bytes each, 1 MB) took the loop seconds to
    # inflate one by one, before the signature was checked (found by review). Past
    # MAX_GZIP_MEMBERS the body is refused, at once.
    empty = gzip.compress(b"", mtime=0)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    started = time.monotonic()
    resp = await client.post("/webhooks/whatsapp", data=empty * 50_000, headers=headers)
    answer = await resp.json()
    assert (resp.status, answer["code"], answer["param"]) == (
        400,
        "unreadable_body",
        "Content-Encoding",
    )
    assert f"more than {MAX_GZIP_MEMBERS} gzip members" in answer["error"]
    assert time.monotonic() - started < 2
    # As many members as are taken still make one body.
    conversation = await add_conversation(store_of(client))
    fields = json.dumps({"accountId": "acme", "eventName": "Purchase", "eventId": "members",
                         "value": 5, "currency": "USD",
                         "conversationId": conversation.id}).encode()  # fmt: skip
    packed = gzip.compress(fields) + empty * (MAX_GZIP_MEMBERS - 1)
    resp = await client.post("/v1/whatsapp/conversions", data=packed, headers={**AUTH, **headers})
    assert resp.status == 200, await resp.text()


async def test_compressed_bytes_are_held_to_the_limit_before_they_inflate(
    client: Client,
) -> None:
    # Unsigned, unauthenticated, chunked (no Content-Length): a tiny gzip member followed by
    # megabytes the inflater would keep (or endless empty deflate blocks) is refused once the
    # bytes sent pass the route's limit, not read to the end.
    async def chunks() -> AsyncIterator[bytes]:
        yield gzip.compress(b"{}")
        for _ in range(64):
            yield os.urandom(1 << 20)

    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    resp = await client.post("/webhooks/whatsapp", data=chunks(), headers=headers)
    answer = await resp.json()
    limit = WebhookConfig().max_body_bytes
    assert (resp.status, answer["details"]["maxBodyBytes"]) == (413, limit)


async def test_failed_authentications_are_limited_per_client_address(
    make_client: ClientFactory, config: dict[str, Any], logs: LogCapture
) -> None:
    auth = {**config["auth"], "failed_per_s": 0.5, "failed_burst": 3}
    client = await make_client(auth=auth)
    url = "/v1/whatsapp/conversions?accountId=acme"
    bad = {"Authorization": "Bearer not-the-key-0123456789"}
    for _ in range(3):
        assert (await client.get(url, headers=bad)).status == 401
    # Past the budget a failure says nothing more than "slow down"...
    for _ in range(3):
        resp = await client.get(url, headers=bad)
        answer = await resp.json()
        assert (resp.status, answer["code"]) == (429, "too_many_failed_authentications")
        assert int(resp.headers["Retry-After"]) >= 1
    # ...and is logged once, not at every failure.
    (line,) = logs.events("auth_failures_limited")
    assert line["client"] == "127.0.0.1"
    # Valid credentials from the same address are never refused: nobody can lock others out.
    assert (await client.get(url, headers=AUTH)).status == 200
    assert (await client.get("/healthz")).status == 200
    # A wrong webhook verify token counts too.
    params = {"hub.mode": "subscribe", "hub.verify_token": "guess", "hub.challenge": "1"}
    assert (await client.get("/webhooks/whatsapp", params=params)).status == 429


async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    auth = {**config["auth"], "failed_per_s": 0.01, "failed_burst": 1}
    client = await make_client(
        auth=auth, server={"trusted_proxies": ["127.0.0.1"]}, metrics={"key_env": "CTWA_SCOPED_KEY"}
    )
    url = "/v1/whatsapp/conversions?accountId=acme"
    bad = {"Authorization": "Bearer not-the-key-0123456789"}
    first = {**bad, "X-Forwarded-For": "203.0.113.7"}
    assert (await client.get(url, headers=first)).status == 401
    assert (await client.get(url, headers=first)).status == 429
    # Another client behind the same proxy has its own budget.
    other = {**bad, "X-Forwarded-For": "198.51.100.9, 127.0.0.1"}
    assert (await client.get(url, headers=other)).status == 401


def test_ipv6_clients_count_per_64() -> None:
    assert client_address("2001:db8::1", None, []) == client_address("2001:db8::ffff", None, [])
    assert client_address("2001:db8:0:1::1", None, []) != client_address("2001:db8::1", None, [])
    assert client_address("::ffff:192.0.2.1", None, []) == "192.0.2.1"


async def test_an_open_metrics_endpoint_off_loopback_is_refused_at_startup(
    make_client: ClientFactory,
) -> None:
    with pytest.raises(ConfigError, match=r"/metrics would be open to anyone on 0\.0\.0\.0"):
        await make_client(server={"host": "0.0.0.0"})
    client = await make_client(server={"host": "0.0.0.0"}, metrics={"public": True})
    assert (await client.get("/metrics")).status == 200


async def test_dataset_without_the_meta_sink_says_which_sink_serves_it(client: Client) -> None:
    resp = await client.get("/v1/whatsapp/dataset", params={"accountId": "acme"}, headers=AUTH)
    answer = await resp.json()
    assert resp.status == 404
    assert "meta_capi" in answer["error"]


class Faulty:
    """A normalizer with a bug: it raises a ValueError for one event."""

    @hookimpl
    def gateway_normalize_event(self, draft: EventDraft, request: ConversionRequest) -> None:
        if request.event_id == "boom":
            raise ValueError("a plugin bug")


async def test_an_unexpected_error_of_any_type_is_one_500_envelope(
    make_client: ClientFactory, config: dict[str, Any], logs: LogCapture
) -> None:
    plugins = {**config["plugins"], "normalizers": [*PluginsConfig().normalizers, "faulty"]}
    client = await make_client(plugins=plugins, extra={"faulty": Faulty()})
    body = {"accountId": "acme", "eventName": "LeadSubmitted", "eventId": "boom",
            "conversationId": (await add_conversation(store_of(client))).id}  # fmt: skip
    resp = await client.post("/v1/whatsapp/conversions", json=body, headers=AUTH)
    answer = await resp.json()
    assert (resp.status, answer["code"]) == (500, "internal_error")
    request_id = resp.headers["X-Request-Id"]
    (line,) = logs.events("unhandled_error")
    assert line["request_id"] == request_id
    assert line["error_type"] == "ValueError"
    assert "a plugin bug" in json.dumps(line["exception"])
    (canonical,) = [r for r in logs.events("request") if r["status"] == 500]
    assert canonical["error_code"] == "internal_error"


async def test_a_request_aiohttp_cannot_parse_logs_no_header(
    client: Client, logs: LogCapture
) -> None:
    assert client.server.host is not None
    assert client.server.port is not None
    head = (
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + f"Authorization: Bearer {API_KEY}\rX\r\n".encode()
    )
    status, _, _ = await asyncio.to_thread(raw_http, client.server.host, client.server.port, head)
    assert status == 400
    assert API_KEY not in logs.text
    assert logs.events("library_error")


@pytest.mark.parametrize("expect", [b"\xa0", b"200-ok", b"100-continue"])
async def test_any_expect_header_is_answered_by_the_app(client: Client, expect: bytes) -> None:
    assert client.server.host is not None
    assert client.server.port is not None
    head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nExpect: " + expect + b"\r\n"
    status, response_head, _ = await asyncio.to_thread(
        raw_http, client.server.host, client.server.port, head
    )
    assert status in (100, 200)
    assert b"X-Request-Id" in response_head or status == 100


@pytest.mark.parametrize("invisible", ["\u200b", "\u2028", "\ufeff", "\u061c", "\U000e0041"])
async def test_invisible_characters_in_identifiers_are_400(client: Client, invisible: str) -> None:
    body = {"accountId": "acme", "eventName": "Purchase", "eventId": f"a{invisible}b",
            "conversationId": "conv_x"}  # fmt: skip
    resp = await client.post("/v1/whatsapp/conversions", json=body, headers=AUTH)
    assert (resp.status, (await resp.json())["param"]) == (400, "eventId")


async def test_a_reload_that_drops_the_app_secret_is_warned_about(
    client: Client, logs: LogCapture
) -> None:
    assert reload_secrets(client.app, {**ENV, "CTWA_APP_SECRET": ""})
    assert logs.events("webhook_disabled")
    resp = await client.post("/webhooks/whatsapp", data=b"{}")
    assert resp.status == 503


async def test_an_open_metrics_endpoint_behind_a_proxy_is_refused(
    make_client: ClientFactory,
) -> None:
    with pytest.raises(ConfigError, match="/metrics would be open to anyone through your proxy"):
        await make_client(server={"trusted_proxies": ["127.0.0.1"]})


async def test_the_metrics_key_needs_the_bearer_scheme_in_any_case(
    make_client: ClientFactory,
) -> None:
    client = await make_client(metrics={"key_env": "CTWA_SCOPED_KEY"})
    key = ENV["CTWA_SCOPED_KEY"]
    assert (await client.get("/metrics", headers={"Authorization": f"bearer {key}"})).status == 200
    assert (await client.get("/metrics", headers={"Authorization": key})).status == 401
