"""Meta's Graph API as the gateway uses it: POST events and datasets, and what errors mean.

Every reply is classified (META.md §2): ``ok``; ``transient`` (5xx, timeouts, dropped
connections, non-JSON bodies, an egress proxy refusing the tunnel, ``is_transient``, codes 1,
2, 341) and ``throttled`` (HTTP 429,
whatever its body, codes 4, 17, 32, 368, 613, 80004), both retried; ``permanent`` (code 100
and its subcodes, 190, 10, 200-299, any other 4xx), never retried. The token travels in the
``Authorization`` header, never in a URL, so no access log anywhere sees it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import msgspec

__all__ = ["GraphClient", "GraphError", "GraphReply", "explain"]

Kind = Literal["ok", "transient", "throttled", "permanent"]

_TRANSIENT_CODES = frozenset({1, 2, 341})
# Secrets at least this long are cut out of Meta's replies.
_SECRET_CUT_MIN = 16
# 368 is a temporary block for a policy violation: Meta's error guide says wait and retry, and
# every other request of the account would meet it meanwhile, so it holds the account too.
_THROTTLE_CODES = frozenset({4, 17, 32, 368, 613, 80004})


class GraphError(msgspec.Struct, frozen=True, kw_only=True):
    """Meta's ``error`` object (unknown fields ignored)."""

    message: str = ""
    type: str | None = None
    code: int | None = None
    error_subcode: int | None = None
    is_transient: bool | None = None
    error_user_title: str | None = None
    error_user_msg: str | None = None
    fbtrace_id: str | None = None


class _ErrorBody(msgspec.Struct, frozen=True):
    error: GraphError


class _EventsBody(msgspec.Struct, frozen=True):
    events_received: int | None = None
    messages: list[Any] = msgspec.field(default_factory=list)
    fbtrace_id: str | None = None


class _IdBody(msgspec.Struct, frozen=True):
    id: str


_error_decoder = msgspec.json.Decoder(_ErrorBody)
_events_decoder = msgspec.json.Decoder(_EventsBody)
_id_decoder = msgspec.json.Decoder(_IdBody)
_encode = msgspec.json.Encoder().encode


class GraphReply(msgspec.Struct, frozen=True, kw_only=True):
    """What one Graph request came to."""

    kind: Kind
    http_status: int | None = None
    events_received: int | None = None
    warnings: list[str] = msgspec.field(default_factory=list)
    trace_id: str | None = None
    error: GraphError | None = None
    # Why a request did not get a Graph answer at all (timeout, connection, not JSON, the
    # egress proxy refused the tunnel).
    transport: str | None = None
    retry_after: float | None = None
    new_id: str | None = None
    duration_ms: float = 0.0

    def error_code(self) -> str:
        """Return ``code`` or ``code/subcode`` (or what went wrong in transport)."""
        if self.error is not None and self.error.code is not None:
            sub = self.error.error_subcode
            return f"{self.error.code}/{sub}" if sub else str(self.error.code)
        if self.transport:
            return self.transport
        return f"http_{self.http_status}"

    def is_not_graph_api(self) -> bool:
        """Tell whether a 4xx came from someone other than the Graph API (a proxy, a wrong
        graph_url): Graph answers its errors in JSON."""
        status = self.http_status
        return (
            self.transport in ("not_json", "proxy")
            and status is not None
            and 400 <= status < 500
            and status != 429
        )

    def is_too_large(self) -> bool:
        """Tell whether the request was refused for its size (HTTP 413): nothing of it was
        taken, so its halves may go instead."""
        return self.kind != "ok" and self.http_status == 413

    def is_event_level(self) -> bool:
        """Tell whether one bad event could explain the rejection (worth splitting a batch)."""
        e = self.error
        return (
            self.kind == "permanent" and e is not None and e.code == 100 and e.error_subcode != 33
        )


def classify(http_status: int, error: GraphError | None) -> Kind:
    """Return what a Graph answer means for retrying."""
    # A 429 says "too many" whatever its body (an edge proxy's is plain text): its Retry-After
    # is kept and the account held, as for Meta's own throttling codes.
    if http_status == 429 or (error is not None and error.code in _THROTTLE_CODES):
        return "throttled"
    if error is None:
        return "ok" if 200 <= http_status < 300 else "transient"
    if error.is_transient or error.code in _TRANSIENT_CODES or http_status >= 500:
        return "transient"
    return "permanent"


def explain(reply: GraphReply) -> str:
    """Return an actionable reason for a failed reply."""
    e = reply.error
    if e is None and reply.transport == "not_json":
        return _not_json(reply.http_status)
    if e is None and reply.transport == "proxy":
        return _proxy_refused(reply.http_status)
    if e is None:
        return {
            "timeout": "Meta did not answer in time",
            "connection": "could not reach Meta (connection failed or was dropped)",
            "proxy_connection": "could not reach the egress proxy (connection failed): check"
            " that it runs, and the host and port in the URL [plugins.meta_capi] proxy_env"
            " names",
        }.get(reply.transport or "", f"Meta answered HTTP {reply.http_status}")
    code, sub = e.code, e.error_subcode
    detail = e.error_user_msg or e.message
    if code == 190:
        return (
            "the access token is invalid or expired: put a new system-user token in the"
            " account's access_token_env (in the [secrets] file), send the gateway SIGHUP"
            f" (`systemctl reload ctwa-gateway`), then run `ctwa-gateway replay` ({detail})"
        )
    if code == 100 and sub == 33:
        return (
            "the dataset does not exist or this token cannot reach it: check the account's"
            f" dataset_id, or POST /v1/whatsapp/dataset ({detail})"
        )
    if code == 10 or (code is not None and 200 <= code <= 299):
        return (
            "permission denied: the token needs ads_management and whatsapp_business_management"
            f" on this WABA and dataset ({detail})"
        )
    if code == 368:
        return f"Meta has blocked this app or account for a while (a policy block) ({detail})"
    if sub == 2804066:
        return f"Meta does not accept this event name for business messaging ({detail})"
    if sub == 2804087:
        return f"invalid ctwa_clid: not a click id of this WABA's ads ({detail})"
    if sub == 2804003:
        return f"the event is older than 7 days ({detail})"
    if sub == 2804063:
        return f"messaging_channel is missing ({detail})"
    return detail or f"Meta error {reply.error_code()}"


def _not_json(status: int | None) -> str:
    """Return what an answer that is not JSON likely means: the Graph API answers its errors
    in JSON, so a 4xx that is not is someone else's (a proxy, a wrong graph_url)."""
    said = f"Meta answered HTTP {status} with a body that is not JSON"
    if status == 413:
        return (
            "something between the gateway and Meta (a proxy's body limit) refused the request"
            " as too large (HTTP 413, not a Graph API answer): batches are split to fit; lower"
            " [plugins.meta_capi] batch_max or raise that limit"
        )
    if status == 407:
        return (
            "a proxy between the gateway and Meta asks for authentication (HTTP 407, not a"
            " Graph API answer): let the gateway's host through it"
        )
    if status is not None and 400 <= status < 500:
        return (
            f"{said}, so not the Graph API's: check [plugins.meta_capi] graph_url (and"
            " api_version), and any proxy between the gateway and Meta"
        )
    return said


def _proxy_refused(status: int | None) -> str:
    """Return what the egress proxy's refusal to open a tunnel to Meta likely means."""
    if status == 407:
        return (
            "the egress proxy asks for authentication (HTTP 407, not a Graph API answer): check"
            " the user and password in the URL [plugins.meta_capi] proxy_env names"
        )
    return (
        f"the egress proxy refused to open a connection to Meta (HTTP {status}, not a Graph"
        " API answer): check that it lets the gateway's host reach graph_url"
    )


def appsecret_proof(app_secret: bytes, token: str) -> str:
    """Return Graph's ``appsecret_proof``: HMAC-SHA256 of the token with the app secret."""
    return hmac.new(app_secret, token.encode(), hashlib.sha256).hexdigest()


# Graph API v25.0 is supported until 2028-07-29 (META.md §3b); v26.0 works the same way.
DEFAULT_GRAPH_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v25.0"


class GraphClient:
    """POSTs to one Graph API base URL and version, with a shared session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        graph_url: str,
        api_version: str,
        timeout_s: float,
        app_secret: bytes | None = None,
        proxy: str | None = None,
    ) -> None:
        self.session = session
        self.base = f"{graph_url.rstrip('/')}/{api_version}"
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.app_secret = app_secret
        # Every request goes through this egress proxy (CONNECT for https), if set.
        self.proxy = proxy

    async def send_events(self, dataset_id: str, token: str, body: dict[str, Any]) -> GraphReply:
        """POST ``body`` to ``/{dataset_id}/events``."""
        return await self._post(f"{self.base}/{dataset_id}/events", token, body, _events_decoder)

    async def create_dataset(self, waba_id: str, token: str) -> GraphReply:
        """POST ``/{waba_id}/dataset``: Meta creates the WABA's dataset or returns it."""
        return await self._post(f"{self.base}/{waba_id}/dataset", token, {}, _id_decoder)

    async def _post(
        self, url: str, token: str, body: dict[str, Any], decoder: msgspec.json.Decoder[Any]
    ) -> GraphReply:
        payload = dict(body)
        if self.app_secret is not None:
            payload["appsecret_proof"] = appsecret_proof(self.app_secret, token)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        started = time.perf_counter()
        try:
            async with self.session.post(
                url, data=_encode(payload), headers=headers, timeout=self.timeout, proxy=self.proxy
            ) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            return GraphReply(kind="transient", transport="timeout", duration_ms=_ms(started))
        except aiohttp.ClientHttpProxyError as exc:
            # The egress proxy refused the tunnel to Meta (CONNECT, for https): its answer,
            # not the Graph API's, as a plain 4xx through an http one would be. (Its message
            # holds the proxy's URL, password included: only the status is kept.)
            return GraphReply(
                kind=classify(exc.status, None),
                http_status=exc.status,
                transport="proxy",
                duration_ms=_ms(started),
            )
        except aiohttp.ClientConnectorError as exc:
            # Through a proxy, the connections made are to the proxy (a name that does not
            # resolve, a port nothing listens on): Meta was never asked.
            if self.proxy is not None and exc.host == urlsplit(self.proxy).hostname:
                transport = "proxy_connection"
            else:
                transport = "connection"
            return GraphReply(kind="transient", transport=transport, duration_ms=_ms(started))
        except aiohttp.ClientError:
            return GraphReply(kind="transient", transport="connection", duration_ms=_ms(started))
        # Meta quotes a malformed token back ("Malformed access token EAA..."): its words go
        # to logs, the store and API answers, so the secrets this request carried are cut out
        # of them first, wherever they appear.
        for secret in (token, payload.get("appsecret_proof")):
            # A short test token ("1") would cut into the reply's own numbers; a real token
            # is far longer than this.
            if secret and len(secret) >= _SECRET_CUT_MIN:
                raw = raw.replace(secret.encode(), b"[redacted]")
        return _reply(status, raw, decoder, retry_after, _ms(started))


def _reply(
    status: int,
    raw: bytes,
    decoder: msgspec.json.Decoder[Any],
    retry_after: float | None,
    duration_ms: float,
) -> GraphReply:
    common: dict[str, Any] = {
        "http_status": status,
        "retry_after": retry_after,
        "duration_ms": duration_ms,
    }
    try:
        error = _error_decoder.decode(raw).error
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        error = None
    if error is not None:
        return GraphReply(
            kind=classify(status, error), error=error, trace_id=error.fbtrace_id, **common
        )
    if not 200 <= status < 300:
        return GraphReply(kind=classify(status, None), transport="not_json", **common)
    try:
        ok = decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return GraphReply(kind="transient", transport="not_json", **common)
    if isinstance(ok, _IdBody):
        return GraphReply(kind="ok", new_id=ok.id, **common)
    return GraphReply(
        kind="ok",
        events_received=ok.events_received,
        warnings=[_encode(m).decode() if not isinstance(m, str) else m for m in ok.messages],
        trace_id=ok.fbtrace_id,
        **common,
    )


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
