"""Sink: POST every conversion to a webhook as JSON, with the gateway's outbox behind it.

The sink only says how one batch went; the gateway does the rest (durable outbox, batching,
backoff, expiry, ``ctwa-gateway replay --sink http_sink``, ``ctwa_events_outcome`` metrics,
and the attempts in ``GET /v1/whatsapp/conversions/{eventId}``).

Each call POSTs ``{"events": [...]}`` (at most ``delivery.batch_max`` of them, each with its
``eventId``, ``accountId``, ``eventName`` and the hashed Meta event) with
``Authorization: Bearer <token>`` from the environment variable ``token_env`` names:

- 2xx: every event delivered;
- 429 and 5xx: retry (no sooner than ``Retry-After``); a dropped connection or a timeout too;
- any other 4xx: failed, with the status and the start of the answer.

    [plugins]
    sinks = ["meta_capi", "http_sink"]

    [plugins.http_sink]
    url = "https://crm.example.com/hooks/ctwa"
    token_env = "ACME_CRM_TOKEN"
    timeout_s = 5

    [plugins.http_sink.delivery]
    batch_max = 50
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

import aiohttp
import msgspec

from gateway import ConfigError, DeliveryOptions, QueuedEvent, SendOutcome, Settings, hookimpl


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    url: Annotated[str, msgspec.Meta(pattern=r"^https?://")]
    token_env: str | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    delivery: DeliveryOptions = DeliveryOptions(batch_max=50)


class _Event(msgspec.Struct, rename="camel"):
    event_id: str
    account_id: str
    event_name: str
    event: dict[str, Any]


class _Batch(msgspec.Struct, rename="camel"):
    events: list[_Event]


_encode = msgspec.json.Encoder().encode


class HttpSink:
    """The plugin object: an HTTP session and the token while the gateway runs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.session: aiohttp.ClientSession | None = None
        self.token = ""

    @hookimpl
    def gateway_check_config(self, settings: Settings, environ: Mapping[str, str]) -> None:
        name = self.config.token_env
        if name and not environ.get(name):
            raise ConfigError(
                f"{settings.source}: environment variable {name} is not set (named at"
                " `$.plugins.http_sink.token_env`)"
            )

    @hookimpl
    def gateway_lifespan(self, environ: Mapping[str, str]) -> AbstractAsyncContextManager[None]:
        return self._session(environ)

    @asynccontextmanager
    async def _session(self, environ: Mapping[str, str]) -> AsyncIterator[None]:
        self.token = environ.get(self.config.token_env or "", "")
        async with aiohttp.ClientSession() as session:
            self.session = session
            try:
                yield
            finally:
                self.session = None

    @hookimpl
    def gateway_reload_secrets(self, environ: Mapping[str, str]) -> list[str]:
        token = environ.get(self.config.token_env or "", "")
        changed, self.token = token != self.token, token
        return ["token"] if changed else []

    @hookimpl
    def gateway_delivery_options(self) -> DeliveryOptions:
        return self.config.delivery

    @hookimpl
    async def gateway_send_events(self, events: list[QueuedEvent]) -> list[SendOutcome]:
        assert self.session is not None  # the gateway sends only while the lifespan is open
        body = _Batch(
            events=[
                _Event(
                    event_id=e.event_id,
                    account_id=e.account_id,
                    event_name=e.event_name,
                    event=e.event,
                )
                for e in events
            ]
        )
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        started = time.perf_counter()
        try:
            async with self.session.post(
                self.config.url,
                data=_encode(body),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            ) as resp:
                text = (await resp.read())[:200].decode("utf-8", "replace")
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcome = SendOutcome(
                status="retry",
                reason=f"the webhook did not answer ({type(exc).__name__})",
                code="unreachable",
            )
            return [outcome] * len(events)
        ms = round((time.perf_counter() - started) * 1000, 3)
        if 200 <= status < 300:
            outcome = SendOutcome(status="delivered", http_status=status, duration_ms=ms)
        elif status == 429 or status >= 500:
            outcome = SendOutcome(
                status="retry",
                reason=f"the webhook answered HTTP {status}",
                code=f"http_{status}",
                http_status=status,
                retry_after_s=_seconds(retry_after),
                duration_ms=ms,
            )
        else:
            outcome = SendOutcome(
                status="failed",
                reason=f"the webhook refused the events with HTTP {status}: {text!r}; fix the"
                " webhook or [plugins.http_sink], then run `ctwa-gateway replay --sink"
                " http_sink`",
                code=f"http_{status}",
                http_status=status,
                duration_ms=ms,
            )
        return [outcome] * len(events)


def _seconds(value: str | None) -> float | None:
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None


def make_plugin(config: Config) -> HttpSink:
    return HttpSink(config)
