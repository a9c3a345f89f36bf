"""Which event names Meta takes for business messaging today: ask Meta, one test event a name.

The names drift (META.md §3b: Zernio's five, Meta's FAQ's fourteen, live checks that disagree).
:func:`probe_event_names` sends one event per candidate name, with a ``test_event_code`` (so
nothing counts) and a real conversation's click id (so only the name can be wrong), each in a
request of its own (Meta refuses a whole batch for one bad event), and records nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import aiohttp
import msgspec

from gateway.config import AccountConfig, Settings
from gateway.domain import Conversation
from gateway.draft import EventDraft
from gateway.errors import ConfigError
from gateway.plugin_manager import Plugins
from gateway.wire import ConversionRequest
from plugins.meta_capi import access_token, env_secret, proxy_url
from plugins.meta_capi.body import DEFAULT_PARTNER_AGENT, meta_request_body
from plugins.meta_capi.graph import DEFAULT_API_VERSION, DEFAULT_GRAPH_URL, GraphClient, explain

__all__ = ["FAQ_EVENT_NAMES", "GraphSettings", "ProbeResult", "probe_event_names"]

# Meta's FAQ for business messaging (META.md §1): the default candidates, with the configured.
FAQ_EVENT_NAMES = (
    "LeadSubmitted", "Purchase", "AddToCart", "InitiateCheckout", "ViewContent",
    "OrderCreated", "OrderShipped", "OrderDelivered", "OrderCanceled", "OrderReturned",
    "CartAbandoned", "QualifiedLead", "RatingProvided", "ReviewProvided",
)  # fmt: skip
_INVALID_EVENT_TYPE = 2804066


class GraphSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where to reach Meta: the ``[plugins.meta_capi]`` keys the probe shares with the sink."""

    graph_url: str = DEFAULT_GRAPH_URL
    api_version: str = DEFAULT_API_VERSION
    timeout_s: float = 10.0
    partner_agent: str = DEFAULT_PARTNER_AGENT
    app_secret_env: str | None = None
    proxy_env: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> GraphSettings:
        """Read the ``[plugins.meta_capi]`` table, ignoring the sink's other keys."""
        table = settings.plugin_tables.get("meta_capi", {})
        known = {k: v for k, v in table.items() if k in cls.__struct_fields__}
        try:
            return msgspec.convert(known, cls)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{settings.source}: [plugins.meta_capi]: {exc}") from None


class ProbeResult(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    # "accepted", "refused" (2804066: not an event type for business messaging), or "error".
    verdict: str
    detail: str = ""
    trace_id: str | None = None


async def probe_event_names(
    names: Sequence[str],
    *,
    settings: Settings,
    plugins: Plugins,
    account: AccountConfig,
    conversation: Conversation,
    dataset_id: str,
    test_code: str,
    graph: GraphSettings,
    environ: Mapping[str, str],
) -> list[ProbeResult]:
    """Send one test event per name to Meta; return what Meta said of each."""
    token = access_token(account, environ)
    if not token:
        raise ConfigError(
            f"account {account.id!r} has no access token: set the variable its"
            " access_token_env names"
        )
    secret = env_secret(environ, graph.app_secret_env)
    try:
        proxy = proxy_url(environ, graph.proxy_env)
    except ValueError as exc:
        raise ConfigError(f"[plugins.meta_capi] proxy_env: {exc}") from None
    results = []
    run = int(time.time())
    async with aiohttp.ClientSession() as session:
        client = GraphClient(
            session,
            graph_url=graph.graph_url,
            api_version=graph.api_version,
            timeout_s=graph.timeout_s,
            app_secret=secret.encode() if secret else None,
            proxy=proxy,
        )
        for name in names:
            request = ConversionRequest(
                account_id=account.id,
                event_name=name,
                event_id=f"probe-{run}-{name}",
                conversation_id=conversation.id,
                test_code=test_code,
                # Every name gets a value: a Purchase without one would fail for that reason.
                value=1.0,
                currency="USD",
            )
            # The configured normalizers build it, as for a real conversion; validation's
            # allowlist is exactly what is being probed, so it is not asked.
            draft = EventDraft()
            plugins.normalize(draft, request, account, conversation, time.time())
            body = meta_request_body(
                [draft.finish()], partner_agent=graph.partner_agent, test_event_code=test_code
            )
            reply = await client.send_events(dataset_id, token, body)
            if reply.kind == "ok":
                results.append(ProbeResult(name=name, verdict="accepted", trace_id=reply.trace_id))
            elif reply.error is not None and reply.error.error_subcode == _INVALID_EVENT_TYPE:
                results.append(
                    ProbeResult(
                        name=name, verdict="refused", detail=explain(reply), trace_id=reply.trace_id
                    )
                )
            else:
                results.append(
                    ProbeResult(
                        name=name, verdict="error", detail=explain(reply), trace_id=reply.trace_id
                    )
                )
    return results
