"""A fake Graph API: a real aiohttp server that checks events as Meta does and fails on demand.

It validates each batch the way META.md §2 describes Meta (business-messaging fields, click id,
event names, 7-day age, 1,000 events) and rejects the whole batch for one bad event. Tests
queue failure modes with :meth:`FakeGraph.fail`; each request consumes one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# What Meta took when checked live (META.md §3b): Zernio's five on v25.0, and five more a team
# saw accepted on 2026-04-27; OrderShipped/Delivered/Canceled/Returned (in Meta's own FAQ) and
# anything else are refused with subcode 2804066, as Meta refused them.
META_EVENT_NAMES = frozenset(
    {
        "LeadSubmitted", "Purchase", "AddToCart", "InitiateCheckout", "ViewContent",
        "QualifiedLead", "OrderCreated", "CartAbandoned", "RatingProvided", "ReviewProvided",
    }
)  # fmt: skip
BAD_CLID = "bad-clid"


@dataclass
class Received:
    dataset_id: str
    token: str
    test_event_code: str | None
    partner_agent: str | None
    event: dict[str, Any]
    appsecret_proof: str | None = None


@dataclass
class FakeGraph:
    """State and controls of the fake; ``app()`` is what the test serves."""

    tokens: dict[str, str] = field(default_factory=dict)  # dataset id -> the token it takes
    received: list[Received] = field(default_factory=list)
    requests: list[tuple[str, int, int]] = field(default_factory=list)  # dataset, size, status
    datasets_created: list[str] = field(default_factory=list)
    failures: deque[str] = field(default_factory=deque)
    delay_s: float = 0.0
    # A dataset's own delay, read as each of its requests arrives (instead of delay_s).
    delays: dict[str, float] = field(default_factory=dict)
    # A proxy in front with a body limit (nginx's client_max_body_size): a plain 413 past it.
    max_body_bytes: int | None = None
    # Report fewer events received than sent, once.
    undercount: int = 0
    url_queries: list[str] = field(default_factory=list)
    # The Graph API version of each events request (the path's first segment).
    versions: list[str] = field(default_factory=list)
    _trace: int = 0

    def fail(self, *modes: str) -> None:
        """Queue failure modes, one per request: 500, timeout, html, drop, throttle4,
        throttle17, 429, 429_text (a plain-text 429 asking for 1.5 s), blocked368 (a policy
        block), transient, token190, token_echo, dataset33, permission10, count, keep_none (a
        200 that kept no event, with the warning Meta gives a future one), 404_html (what a
        graph_url that is not the Graph API answers), pass (answered as usual: the failures
        after it meet the requests after this one).
        """
        self.failures.extend(modes)

    def event_ids(self) -> list[str]:
        return [r.event["event_id"] for r in self.received]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{version}/{dataset_id}/events", self.events)
        app.router.add_post("/{version}/{waba_id}/dataset", self.dataset)
        return app

    def _trace_id(self) -> str:
        self._trace += 1
        return f"fbtrace-{self._trace}"

    def _error(
        self, status: int, code: int, message: str, subcode: int | None = None, **extra: Any
    ) -> web.Response:
        error = {
            "message": message,
            "type": "OAuthException",
            "code": code,
            "fbtrace_id": self._trace_id(),
            **extra,
        }
        if subcode is not None:
            error["error_subcode"] = subcode
        return web.json_response({"error": error}, status=status)

    async def _failure(self, request: web.Request, mode: str) -> web.StreamResponse:
        if mode == "500":
            return self._error(500, 1, "An unknown error occurred")
        if mode == "transient":
            return self._error(400, 2, "Service temporarily unavailable", is_transient=True)
        if mode == "timeout":
            await asyncio.sleep(30)
            return web.json_response({})
        if mode == "html":
            return web.Response(
                status=502, text="<html><body>Bad Gateway</body></html>", content_type="text/html"
            )
        if mode == "404_html":
            return web.Response(
                status=404, text="<html><body>Not Found</body></html>", content_type="text/html"
            )
        if mode == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if mode == "throttle4":
            return self._error(400, 4, "Application request limit reached")
        if mode == "throttle17":
            return self._error(400, 17, "User request limit reached")
        if mode == "429":
            return web.json_response(
                {"error": {"message": "Too many calls", "code": 80004, "fbtrace_id": "t429"}},
                status=429,
                headers={"Retry-After": "0.2"},
            )
        if mode == "429_text":
            return web.Response(
                status=429, text="Too Many Requests", headers={"Retry-After": "1.5"}
            )
        if mode == "blocked368":
            return self._error(400, 368, "Temporarily blocked for policies violations")
        if mode == "token_echo":
            # Graph quotes a malformed token back in its message.
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            return self._error(400, 190, f"Malformed access token {token}")
        if mode == "token190":
            return self._error(401, 190, "Error validating access token: Session has expired")
        if mode == "dataset33":
            return self._error(
                400, 100, "Unsupported post request. Object does not exist", subcode=33
            )
        if mode == "keep_none":
            return web.json_response(
                {
                    "events_received": 0,
                    "messages": ["event_time is in the future; the event was discarded"],
                    "fbtrace_id": self._trace_id(),
                }
            )
        if mode == "permission10":
            return self._error(403, 10, "Application does not have permission for this action")
        raise AssertionError(f"unknown failure mode {mode}")

    async def events(self, request: web.Request) -> web.StreamResponse:
        dataset_id = request.match_info["dataset_id"]
        self.versions.append(request.match_info["version"])
        self.url_queries.append(request.query_string)
        delay_s = self.delays.get(dataset_id, self.delay_s)
        body = await request.read()
        if self.max_body_bytes is not None and len(body) > self.max_body_bytes:
            self.requests.append((dataset_id, -1, 413))
            return web.Response(
                status=413,
                text="<html><body>413 Request Entity Too Large</body></html>",
                content_type="text/html",
            )
        if delay_s:
            await asyncio.sleep(delay_s)
        if self.failures and self.failures[0] == "pass":
            self.failures.popleft()
        elif self.failures and self.failures[0] != "count":
            mode = self.failures.popleft()
            response = await self._failure(request, mode)
            self.requests.append((dataset_id, -1, response.status))
            return response
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.tokens.get(dataset_id) != token:
            self.requests.append((dataset_id, -1, 401))
            return self._error(401, 190, "Invalid OAuth access token")
        payload = json.loads(body)
        data = payload.get("data", [])
        problem = self._validate(data)
        if problem is not None:
            self.requests.append((dataset_id, len(data), 400))
            subcode, message = problem
            return self._error(400, 100, message, subcode=subcode, error_user_msg=message)
        now = time.time()
        warnings = []
        accepted = 0
        for event in data:
            if event["event_time"] > now + 60:
                warnings.append("event_time is in the future; the event was discarded")
                continue
            accepted += 1
            self.received.append(
                Received(
                    dataset_id,
                    token,
                    payload.get("test_event_code"),
                    payload.get("partner_agent"),
                    event,
                    payload.get("appsecret_proof"),
                )
            )
        if self.failures and self.failures[0] == "count":
            self.failures.popleft()
            accepted -= 1
        self.requests.append((dataset_id, len(data), 200))
        return web.json_response(
            {"events_received": accepted, "messages": warnings, "fbtrace_id": self._trace_id()}
        )

    def _validate(self, data: list[dict[str, Any]]) -> tuple[int, str] | None:
        if not 1 <= len(data) <= 1000:
            return 2804001, "data must hold 1 to 1000 events"
        now = time.time()
        for event in data:
            user = event.get("user_data", {})
            if event.get("action_source") != "business_messaging":
                return 2804050, "action_source must be business_messaging"
            if event.get("messaging_channel") != "whatsapp":
                return 2804063, "Missing messaging_channel"
            if event.get("event_name") not in META_EVENT_NAMES:
                return 2804066, "Messaging Event Invalid Event Type"
            if not user.get("whatsapp_business_account_id") or not user.get("ctwa_clid"):
                return 2804019, "Missing whatsapp_business_account_id or ctwa_clid"
            if user["ctwa_clid"] == BAD_CLID:
                return 2804087, "Invalid ctwa_clid"
            if not isinstance(event.get("event_time"), int):
                return 2804002, "event_time must be an integer"
            if event["event_time"] < now - 7 * 86400:
                return 2804003, "Event Timestamp Too Old"
        return None

    async def dataset(self, request: web.Request) -> web.StreamResponse:
        waba_id = request.match_info["waba_id"]
        if self.failures:
            return await self._failure(request, self.failures.popleft())
        self.datasets_created.append(waba_id)
        return web.json_response({"id": f"ds-{waba_id}"})
