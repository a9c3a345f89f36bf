"""Sink: deliver to Meta's Conversions API for Business Messaging, through the host's outbox.

The first user of the outbox contract, with nothing of its own beyond Meta: an accepted event
is committed ``pending``; the host's dispatcher hands batches to :func:`gateway_send_events`,
which sends them (:mod:`plugins.meta_capi.sender`) and says what became of each; the host
retries, expires, records and replays. A request waits up to ``respond_within_ms`` for its
event's first attempt: delivered or permanently rejected answer 200 in Zernio's shape,
anything else 202 ``queued``.

Also serves the dataset endpoints (``GET``/``POST /v1/whatsapp/dataset``), which talk to the
same Graph API with the same tokens. Written against :mod:`gateway`'s public API only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated
from urllib.parse import unquote, urlsplit

import aiohttp
import msgspec
from aiohttp import web

from gateway import (
    AccountConfig,
    ConfigError,
    DatasetAnswer,
    DatasetRequest,
    DeliveryOptions,
    Metrics,
    PlatformError,
    PreparedEvent,
    QueuedEvent,
    SendOutcome,
    Settings,
    SinkState,
    Store,
    Unprocessable,
    authorized_account,
    hookimpl,
    json_response,
    query_account_id,
    read_json,
)
from plugins.meta_capi.body import DEFAULT_PARTNER_AGENT
from plugins.meta_capi.graph import DEFAULT_API_VERSION, DEFAULT_GRAPH_URL, GraphClient, explain
from plugins.meta_capi.sender import GraphSender, Route

EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]
SEVEN_DAYS_S = 7 * 86400
# How often a gateway with an account that has no dataset looks in the store for one another
# gateway on the same store created (POST /v1/whatsapp/dataset there).
DATASET_LOOK_S = 5.0


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    graph_url: Annotated[str, msgspec.Meta(pattern=r"^https?://")] = DEFAULT_GRAPH_URL
    api_version: Annotated[str, msgspec.Meta(pattern=r"^v[0-9]+\.[0-9]+$")] = DEFAULT_API_VERSION
    partner_agent: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = DEFAULT_PARTNER_AGENT
    # Meta takes up to 1,000 events per request.
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1000
    linger_ms: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 5
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    retry_base_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 2.0
    retry_cap_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 600.0
    # Meta refuses events older than 7 days: past this an event expires instead of retrying.
    max_age_s: Annotated[int, msgspec.Meta(ge=60, le=SEVEN_DAYS_S)] = SEVEN_DAYS_S
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    # How long a conversion request waits for its event's first attempt before answering 202.
    respond_within_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 3000
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0, le=300)] = 10.0
    # How often an idle dispatcher looks for work queued by another process (replay).
    poll_s: Annotated[float, msgspec.Meta(ge=0.05, le=300)] = 5.0
    # How long a process's claim on an event it is sending lasts unless renewed: another
    # process (replica) takes the event after this long if the claimant dies.
    claim_lease_s: Annotated[float, msgspec.Meta(ge=1, le=600)] = 10.0
    # For appsecret_proof, when the app requires it.
    app_secret_env: EnvName | None = None
    # The variable holding the egress proxy's URL (http://[user:password@]host:port), when
    # Meta is reachable only through one. Named, not read from HTTPS_PROXY by itself: the
    # proxy may carry credentials, and a machine-wide variable must not redirect the
    # gateway's traffic unasked.
    proxy_env: EnvName | None = None


def env_secret(environ: Mapping[str, str], name: str | None) -> str:
    """Return the secret in the variable ``name`` ("" if unset or unnamed), without the
    surrounding whitespace a secret mounted from a file often ends with (a newline): the
    [secrets] file's values are read the same way."""
    return environ.get(name, "").strip() if name else ""


def proxy_url(environ: Mapping[str, str], name: str | None) -> str | None:
    """Return the egress proxy's URL from the variable ``name`` (None if unnamed or empty);
    raise ValueError, without the value (it may carry a password), if it is not an
    http(s) URL with a host."""
    url = env_secret(environ, name)
    if not url:
        return None
    try:
        parsed = urlsplit(url)
        scheme, host = parsed.scheme, parsed.hostname
        parsed.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        scheme, host = "", None
    if scheme not in ("http", "https") or not host:
        raise ValueError(f"environment variable {name} is not an http:// or https:// URL")
    try:
        # As the proxy's Basic authentication carries them (aiohttp's, Latin-1).
        unquote(f"{parsed.username or ''}:{parsed.password or ''}").encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(
            f"environment variable {name}: the proxy's user or password holds a character"
            " Basic authentication cannot carry (outside Latin-1)"
        ) from None
    return url


def access_token(account: AccountConfig, environ: Mapping[str, str]) -> str:
    """Return the account's Graph API token from ``environ`` (see :func:`env_secret`)."""
    return env_secret(environ, account.access_token_env)


class MetaCapiSink:
    """The plugin object: one per app, holding the Graph session while the app runs."""

    # test_mode forces a code (and leaves the dataset endpoints to meta_capi, when listed).
    forced_test_event_code: str | None = None

    def __init__(self, config: Config) -> None:
        self.config = config
        # Set while the app runs (the lifespan).
        self.sender: GraphSender | None = None
        self.store: Store | None = None
        self.tokens: dict[str, str] = {}
        self.stored_datasets: dict[str, str] = {}
        self.settings: Settings | None = None

    def dataset_for(self, account: AccountConfig) -> str | None:
        """Return the account's dataset id: configured, else created through the API."""
        return account.dataset_id or self.stored_datasets.get(account.id)

    @hookimpl
    def gateway_check_config(
        self, settings: Settings, environ: Mapping[str, str], delivering: bool
    ) -> None:
        for i, account in enumerate(settings.accounts):
            where = f"`$.accounts[{i}].access_token_env`"
            if not account.access_token_env:
                raise ConfigError(
                    f"{settings.source}: account {account.id!r} has no access_token_env; the"
                    f" Meta sink needs a token for every account - at {where}"
                )
            if not delivering:
                continue  # a dry run: where the token will come from is all that is checked
            token = access_token(account, environ)
            if not token:
                raise ConfigError(
                    f"{settings.source}: account {account.id!r}: environment variable"
                    f" {account.access_token_env} is not set (named at {where})"
                )
            if not token.isprintable() or any(c.isspace() for c in token):
                # It goes in an HTTP header: every send would fail before reaching Meta.
                raise ConfigError(
                    f"{settings.source}: account {account.id!r}: environment variable"
                    f" {account.access_token_env} holds a space or control character inside"
                    f" the token; set it to the token alone (named at {where})"
                )
        secret = self.config.app_secret_env
        if delivering and secret and not env_secret(environ, secret):
            raise ConfigError(f"{settings.source}: environment variable {secret} is not set")
        proxy = self.config.proxy_env
        if delivering and proxy:
            try:
                found = proxy_url(environ, proxy)
            except ValueError as exc:
                raise ConfigError(
                    f"{settings.source}: [plugins.meta_capi] proxy_env: {exc}"
                ) from None
            if found is None:
                raise ConfigError(f"{settings.source}: environment variable {proxy} is not set")

    @hookimpl
    def gateway_reload_secrets(
        self, settings: Settings, environ: Mapping[str, str]
    ) -> list[str] | None:
        tokens = {a.id: access_token(a, environ) for a in settings.accounts}
        changed = [
            f"access_token:{a}" for a, token in tokens.items() if token != self.tokens.get(a)
        ]
        self.tokens = tokens
        secret = env_secret(environ, self.config.app_secret_env)
        if self.sender is not None:
            graph = self.sender.graph
            new_secret = secret.encode() if secret else None
            if new_secret != graph.app_secret:
                changed.append("app_secret")
                graph.app_secret = new_secret
            # gateway_check_config has already refused a malformed one.
            proxy = proxy_url(environ, self.config.proxy_env)
            if proxy != graph.proxy:
                changed.append("proxy")
                graph.proxy = proxy
            # Batches already sent keep the route they were sent with; the next ones use these.
            self.sender.routes.update(self._routes(settings))
        return changed

    def _routes(self, settings: Settings) -> dict[str, Route]:
        """Where each account's events go: its dataset, with its token."""
        return {
            a.id: Route(dataset, self.tokens[a.id])
            for a in settings.accounts
            if (dataset := self.dataset_for(a)) and self.tokens.get(a.id)
        }

    @hookimpl
    def gateway_check_ready(self) -> str | None:
        if self.sender is None or self.sender.graph.session.closed:
            return "its Graph API session is not open"
        return None

    def _send_timeout_s(self) -> float:
        # Splitting a batch to find a bad event makes up to ~2 log2(n) requests in a row.
        return min(600.0, self.config.timeout_s * 24)

    @hookimpl
    def gateway_delivery_options(self) -> DeliveryOptions:
        c = self.config
        return DeliveryOptions(
            batch_max=c.batch_max,
            # One Graph request carries one dataset's events of one test code.
            call_per_account=True,
            linger_ms=c.linger_ms,
            max_in_flight=c.max_in_flight,
            retry_base_s=c.retry_base_s,
            retry_cap_s=c.retry_cap_s,
            max_age_s=c.max_age_s,
            respond_within_ms=c.respond_within_ms,
            send_timeout_s=self._send_timeout_s(),
            shutdown_grace_s=c.shutdown_grace_s,
            poll_s=c.poll_s,
            claim_lease_s=c.claim_lease_s,
        )

    @hookimpl
    def gateway_send_events(self, events: list[QueuedEvent]) -> Awaitable[list[SendOutcome]]:
        return self._send(events)

    async def _send(self, events: list[QueuedEvent]) -> list[SendOutcome]:
        # Set for as long as the dispatcher runs: lifespans start first and stop last.
        assert self.sender is not None
        routes = self.sender.routes
        if any(event.account_id not in routes for event in events):
            # Another gateway on this store may have created the dataset since: look before
            # failing these events for want of one.
            await self.look_for_datasets()
        return await self.sender.send(events)

    async def look_for_datasets(self) -> None:
        """Take the datasets other gateways on this store created since this one started."""
        if self.store is None or self.settings is None:
            return
        self.stored_datasets = await self.store.datasets()
        if self.sender is not None:
            self.sender.routes.update(self._routes(self.settings))

    async def _look_while_missing(self, settings: Settings) -> None:
        """Look for datasets now and then while an account has none: until one appears, that
        account's conversions are refused (422 no_dataset) on this gateway."""
        while True:
            await asyncio.sleep(DATASET_LOOK_S)
            if any(self.dataset_for(a) is None for a in settings.accounts):
                try:
                    await self.look_for_datasets()
                except Exception:  # noqa: S112 - the store is away; the next look retries
                    continue

    @hookimpl
    @asynccontextmanager
    async def gateway_lifespan(
        self,
        name: str,
        settings: Settings,
        store: Store,
        environ: Mapping[str, str],
        metrics: Metrics,
    ) -> AsyncIterator[None]:
        c = self.config
        secret = env_secret(environ, c.app_secret_env)
        self.tokens = {a.id: access_token(a, environ) for a in settings.accounts}
        self.stored_datasets = await store.datasets()
        self.store = store
        self.settings = settings
        async with aiohttp.ClientSession() as session:
            graph = GraphClient(
                session,
                graph_url=c.graph_url,
                api_version=c.api_version,
                timeout_s=c.timeout_s,
                app_secret=secret.encode() if secret else None,
                proxy=proxy_url(environ, c.proxy_env),
            )
            self.sender = GraphSender(
                graph,
                sink=name,
                routes=self._routes(settings),
                partner_agent=c.partner_agent,
                forced_test_event_code=self.forced_test_event_code,
                throttle_floor_s=c.retry_base_s * 4,
                metrics=metrics,
                # No request starts past the budget and each is bounded by timeout_s, so a
                # batch always answers before the host's bound cuts it off (outcomes lost).
                budget_s=max(0.0, self._send_timeout_s() - 2 * c.timeout_s) * 0.9,
            )
            looking = asyncio.create_task(self._look_while_missing(settings))
            try:
                yield
            finally:
                looking.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await looking
                self.sender = None

    @hookimpl
    def gateway_accept_event(self, event: PreparedEvent) -> SinkState:
        if self.sender is not None and self.dataset_for(event.account) is None:
            raise Unprocessable(
                f"Account {event.account.id!r} has no dataset: set its dataset_id, or create"
                " one with POST /v1/whatsapp/dataset.",
                code="no_dataset",
                param="accountId",
            )
        return SinkState(status="pending")

    def serves_datasets(self, sinks: list[str]) -> bool:
        """Whether this sink serves the dataset endpoints, given the configured sinks."""
        return True

    @hookimpl
    def gateway_register_routes(self, sinks: list[str]) -> list[web.RouteDef] | None:
        if not self.serves_datasets(sinks):
            return None
        return [
            web.get("/v1/whatsapp/dataset", self.get_dataset),
            web.post("/v1/whatsapp/dataset", self.post_dataset),
        ]

    # -- dataset endpoints ---------------------------------------------------------------------

    async def get_dataset(self, request: web.Request) -> web.Response:
        account = authorized_account(request, query_account_id(request))
        return json_response(DatasetAnswer(dataset_id=await self._dataset_of(account)))

    async def _dataset_of(self, account: AccountConfig) -> str | None:
        """The account's dataset, looked for in the store if this gateway knows of none."""
        known = self.dataset_for(account)
        if known is None:
            await self.look_for_datasets()
            known = self.dataset_for(account)
        return known

    async def post_dataset(self, request: web.Request) -> web.Response:
        wanted = await read_json(request, _DATASET_DECODER)
        account = authorized_account(request, wanted.account_id)
        known = await self._dataset_of(account)
        if known is not None:
            return json_response(DatasetAnswer(dataset_id=known, created=False))
        # Both are set while the app serves.
        assert self.sender is not None
        assert self.store is not None
        reply = await self.sender.graph.create_dataset(account.waba_id, self.tokens[account.id])
        if reply.kind != "ok" or reply.new_id is None:
            raise PlatformError(
                f"Meta refused to create the dataset: {explain(reply)}",
                code="platform_error",
                platform_error=msgspec.to_builtins(reply.error) if reply.error else None,
            )
        await self.store.save_dataset(account.id, reply.new_id)
        self.stored_datasets[account.id] = reply.new_id
        if self.tokens.get(account.id):
            self.sender.routes[account.id] = Route(reply.new_id, self.tokens[account.id])
        return json_response(DatasetAnswer(dataset_id=reply.new_id, created=True))


_DATASET_DECODER = msgspec.json.Decoder(DatasetRequest)


def make_plugin(config: Config) -> MetaCapiSink:
    return MetaCapiSink(config)
