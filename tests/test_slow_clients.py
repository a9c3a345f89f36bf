"""Clients that send slowly, or a lot, before anyone knows who they are: every body has a
deadline, unsigned webhook bodies share a budget, and a connection without a request closes.

Each test talks to the real app over a real socket, byte by byte where it matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.http.keys import SETTINGS, WEBHOOK_BODIES
from tests.conftest import AUTH, ClientFactory, store_of
from tests.payloads import encode, message, messages_change, notification, signed

Client = TestClient[web.Request, web.Application]
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
WEBHOOK = "/webhooks/whatsapp"


@asynccontextmanager
async def connection(client: Client) -> AsyncIterator[Stream]:
    """A raw connection to the app behind ``client``."""
    host, port = client.server.host, client.server.port
    assert host is not None
    assert port is not None
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()


def head(path: str, length: int | None, **headers: str) -> bytes:
    """A POST's request line and headers: a Content-Length, or chunked when ``length`` is None."""
    lines = [f"POST {path} HTTP/1.1", "Host: t", "Content-Type: application/json"]
    lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Read one response: its status, its headers (lowercased names) and its JSON body."""
    status_line = await reader.readline()
    fields: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        fields[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(fields["content-length"]))
    return int(status_line.split()[1]), fields, json.loads(body)


async def test_a_webhook_body_trickled_past_its_deadline_is_408_and_the_connection_closes(
    make_client: ClientFactory,
) -> None:
    # A byte every 50 ms: each read is quick, the body never ends. The deadline is the whole
    # body's, not each read's; before it there was none, and the connection (and what it had
    # sent) stayed for as long as the client liked.
    client = await make_client(server={"body_timeout_s": 0.5})
    async with connection(client) as (reader, writer):
        writer.write(head(WEBHOOK, 100_000))

        async def trickle() -> None:
            while True:
                writer.write(b" ")
                await asyncio.sleep(0.05)

        started = time.monotonic()
        sending = asyncio.create_task(trickle())
        try:
            status, fields, body = await asyncio.wait_for(answer(reader), 5)
        finally:
            sending.cancel()
        elapsed = time.monotonic() - started
        assert (status, body["type"], body["code"]) == (
            408,
            "invalid_request_error",
            "request_timeout",
        )
        assert "[server] body_timeout_s" in body["error"]
        assert body["details"] == {"bodyTimeoutSeconds": 0.5}
        assert fields["connection"] == "close"
        assert 0.5 <= elapsed < 3
        # Closed once what is still in flight has been drained (lingering_time, the same
        # deadline): no second request on it.
        assert await asyncio.wait_for(reader.read(), 3) == b""
    # Nothing half-read went on to the signature check.
    metrics = await (await client.get("/metrics")).text()
    assert "ctwa_webhook_signature_failures_total 0.0" in metrics


async def test_an_api_body_that_stops_arriving_is_408_and_nothing_is_stored(
    make_client: ClientFactory,
) -> None:
    # Authenticated routes read the body after the key is checked, but a key holder's stalled
    # client must not hold a connection forever either: the conversions endpoint, and the
    # replay endpoint that reads through read_json (the helper plugins use).
    client = await make_client(server={"body_timeout_s": 0.3})
    conversion = b'{"accountId": "acme", "eventName": "Purchase", "eventId": "slow-1", '
    for path, part in (
        ("/v1/whatsapp/conversions", conversion),
        ("/v1/whatsapp/replay", b'{"accountId": "acme", '),
    ):
        async with connection(client) as (reader, writer):
            writer.write(head(path, 4000, Authorization=AUTH["Authorization"]) + part)
            status, fields, body = await asyncio.wait_for(answer(reader), 5)
            assert (path, status, body["code"]) == (path, 408, "request_timeout")
            assert fields["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 3) == b""
    assert await store_of(client).find_event("acme", "slow-1") is None


async def test_a_body_sent_in_pieces_within_its_deadline_is_taken(
    make_client: ClientFactory,
) -> None:
    # The timed path (a body that did not come with its headers) reads what arrives late.
    client = await make_client(server={"body_timeout_s": 5})
    body = encode(notification(messages_change([message("16505551234", "wamid.pieces")])))
    async with connection(client) as (reader, writer):
        signature = signed(body)["X-Hub-Signature-256"]
        writer.write(head(WEBHOOK, len(body), X_Hub_Signature_256=signature))
        for at in range(0, len(body), 100):
            writer.write(body[at : at + 100])
            await asyncio.sleep(0.02)
        status, _, answered = await asyncio.wait_for(answer(reader), 5)
    assert status == 200, answered
    assert answered["messages"] == 1


async def test_unsigned_bodies_in_flight_are_held_to_a_budget_past_which_503(
    make_client: ClientFactory,
) -> None:
    # Two senders nobody knows yet hold the whole budget with the bytes they sent (one framed
    # by its Content-Length, one chunked): the next notification is refused, with Retry-After
    # (Meta retries), whoever sent it. 40 connections each holding 8 MiB once took a gateway
    # from 60 MB to 627 MB.
    limit = 64 * 1024
    webhook = {
        "verify_token_env": "CTWA_VERIFY_TOKEN",
        "app_secret_env": "CTWA_APP_SECRET",
        "max_body_bytes": limit,
        "max_bytes_in_flight": 2 * limit,
    }
    client = await make_client(webhook=webhook, server={"body_timeout_s": 30})
    budget = client.app[WEBHOOK_BODIES]
    body = encode(notification(messages_change([message("16505551234", "wamid.budget")])))
    part = limit - 100
    async with connection(client) as (_, first), connection(client) as (_, second):
        first.write(head(WEBHOOK, limit) + b" " * part)
        second.write(head(WEBHOOK, None) + f"{part:x}\r\n".encode() + b" " * part + b"\r\n")
        for _ in range(250):
            if budget.taken == 2 * part:
                break
            await asyncio.sleep(0.02)
        assert budget.taken == 2 * part

        resp = await client.post(WEBHOOK, data=body, headers=signed(body))
        refused = await resp.json()
        assert (resp.status, refused["code"]) == (503, "webhook_busy")
        assert resp.headers["Retry-After"] == "30"
        assert refused["details"] == {"maxBytesInFlight": 2 * limit}

        # A sender that goes away gives its share back.
        first.close()
        for _ in range(250):
            if budget.taken == part:
                break
            await asyncio.sleep(0.02)
        assert budget.taken == part
        resp = await client.post(WEBHOOK, data=body, headers=signed(body))
        assert resp.status == 200, await resp.text()
    for _ in range(250):
        if budget.taken == 0:
            break
        await asyncio.sleep(0.02)
    assert budget.taken == 0
    metrics = await (await client.get("/metrics")).text()
    assert "ctwa_webhook_bodies_refused_total 1.0" in metrics


async def test_senders_that_only_declare_large_bodies_hold_nothing_of_the_budget(
    make_client: ClientFactory,
) -> None:
    # Found by review: counted by Content-Length, eleven connections sending only a head
    # (about 2 KB every body deadline) held the whole default budget, and every signed
    # notification from Meta was a 503 for as long as they kept at it.
    client = await make_client()
    budget = client.app[WEBHOOK_BODIES]
    limit = client.app[SETTINGS].webhook.max_body_bytes
    body = encode(notification(messages_change([message("16505551234", "wamid.realmeta")])))
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(budget.capacity // limit + 1):
            _, writer = await stack.enter_async_context(connection(client))
            writer.write(head(WEBHOOK, limit))  # the head only: not a byte of the body
        await asyncio.sleep(0.2)
        assert budget.taken == 0
        resp = await client.post(WEBHOOK, data=body, headers=signed(body))
        assert resp.status == 200, await resp.text()


async def test_a_connection_without_a_whole_request_closes_after_the_idle_timeout(
    make_client: ClientFactory,
) -> None:
    # aiohttp has no deadline of its own for a request's headers; its keep-alive timer runs
    # from the connection's start (and each answer) until a whole head has arrived, and
    # bytes that do not complete it do not restart it. Before, in tests, an hour; served,
    # 75 s, fixed.
    client = await make_client(server={"idle_timeout_s": 0.5})
    async with connection(client) as (reader, writer):
        # A connection in use is not cut: two requests, one after the other.
        for _ in range(2):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, _ = await asyncio.wait_for(answer(reader), 5)
            assert status == 200
        # Half a head, then nothing more.
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - started < 3
