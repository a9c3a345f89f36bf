"""Hostile review findings, each through the real app: no 500s, nothing silent, nothing leaked."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import API_KEY, ClientFactory, LogCapture
from tests.live import raw_http

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
