"""The Structs that ``config.toml`` decodes into, and :func:`load_settings`.

Secrets never live in the file: it names the environment variables that hold them
(``key_env``, ``access_token_env``), and only :mod:`gateway.http.auth` and the sinks read those.
Every error names the file and the ``$.path`` of the offending value.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from gateway.errors import ConfigError

__all__ = [
    "DEFAULT_EVENT_NAMES",
    "AccountConfig",
    "AuthConfig",
    "AuthKeyConfig",
    "ConsoleConfig",
    "EventsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "PluginsConfig",
    "SecretsConfig",
    "ServerConfig",
    "Settings",
    "StoreConfig",
    "WebhookConfig",
    "load_settings",
    "parse_settings",
]

# Zernio's live-verified list for Graph v25.0 (META.md §1); Meta's FAQ names more, hence the
# allowlist is configurable rather than a Literal.
DEFAULT_EVENT_NAMES = ("LeadSubmitted", "Purchase", "AddToCart", "InitiateCheckout", "ViewContent")

SEVEN_DAYS_S = 7 * 24 * 3600

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]


class ConfigStruct(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base for config tables: a misspelled key is an error, not a silent default."""


class ServerConfig(ConfigStruct, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    # The longest a request's body may take to arrive once the gateway reads it: past it, a
    # 408 and the connection closes (also how long a refused body is drained, so the client
    # sees the answer). A trickling client otherwise held its connection, and the bytes it
    # had sent, for as long as it liked. 10 s is a 1 MiB body at 100 kB/s.
    body_timeout_s: Annotated[float, msgspec.Meta(ge=0.1, le=600)] = 10.0
    # A connection with no request in progress closes after this long: idle between requests,
    # or still sending a request's line and headers (aiohttp has no separate deadline for
    # headers; this timer is not restarted by bytes that do not complete them). 75 s, as
    # aiohttp's run_app: above the idle timeout of the usual proxies and load balancers (nginx
    # 60 s, AWS ALB 60 s), which would otherwise reuse a connection as it closes.
    idle_timeout_s: Annotated[float, msgspec.Meta(ge=0.1, le=86400)] = 75.0
    # Reverse proxies (IPs or CIDRs) whose X-Forwarded-For names the client; from any other
    # peer the header is ignored (anyone can send it).
    trusted_proxies: list[Annotated[str, msgspec.Meta(max_length=64)]] = msgspec.field(
        default_factory=list
    )
    # "auto": uvloop where it is installed (it is a dependency on Linux and macOS), else
    # asyncio's own loop; "asyncio" to rule uvloop out.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"

    def is_loopback(self) -> bool:
        """Tell whether the server listens on loopback only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a hostname: assume it is reachable


class StoreConfig(ConfigStruct, frozen=True):
    # The SQLite file (the default), unless a PostgreSQL database is named below.
    path: str = "var/ctwa-gateway.sqlite3"
    # PostgreSQL instead: a postgresql:// URL without a password (a Unix socket, a
    # password file or trust), or the environment variable that holds one with a password.
    url: Annotated[str, msgspec.Meta(pattern=r"^postgres(ql)?://", max_length=2048)] | None = None
    url_env: EnvName | None = None
    # PostgreSQL connections per replica: the writer's, the readers', the listener's.
    min_connections: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    max_connections: Annotated[int, msgspec.Meta(ge=3, le=1000)] = 10
    # How long a PostgreSQL statement may take before the database counts as not answering:
    # the request gets 503 store_unavailable (nothing acknowledged, safe to retry) rather
    # than waiting on a database that stopped.
    command_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    # The most write operations one transaction carries (group commit).
    group_commit_max: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000
    # How often expired data is pruned (webhook message ids, archived notifications); the
    # first run is this long after start, so startup stays quick.
    housekeeping_interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=86400)] = 3600.0


class AccountConfig(ConfigStruct, frozen=True):
    id: Name
    waba_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,32}$")]
    phone_number_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,32}$")]
    dataset_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,32}$")] | None = None
    access_token_env: EnvName | None = None


class AuthKeyConfig(ConfigStruct, frozen=True):
    name: Name
    key_env: EnvName
    accounts: Annotated[list[Name], msgspec.Meta(min_length=1)]
    # Token bucket per key: sustained requests per second and burst; unset = unlimited.
    rate_per_s: Annotated[float, msgspec.Meta(gt=0, le=100_000)] | None = None
    burst: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None


class AuthConfig(ConfigStruct, frozen=True):
    keys: list[AuthKeyConfig] = msgspec.field(default_factory=list)
    # Failed authentications (any 401) per client address: a token bucket; past it, every
    # request from that address is answered 429 until it refills.
    failed_per_s: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 0.5
    failed_burst: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 20


class PluginsConfig(ConfigStruct, frozen=True):
    resolvers: list[Name] = msgspec.field(
        default_factory=lambda: ["conversation_id", "business_scoped_user_id", "phone"]
    )
    normalizers: list[Name] = msgspec.field(
        default_factory=lambda: [
            "business_messaging",
            "event_time",
            "email",
            "external_id",
            "custom_data",
            "test_event_code",
        ]
    )
    sinks: Annotated[list[Name], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["log"]
    )
    # The longest the host awaits a sink's hook (deliver, or one send of the outbox) before
    # that sink's attempt fails (the answer never waits on a hanging sink longer than this).
    sink_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 30.0
    # The sink whose outcome the Zernio-shaped answer reports (eventsReceived, eventsFailed,
    # failures, traceId, status); unset: meta_capi or test_mode if listed, else the first.
    primary_sink: Name | None = None
    # Entry points allowed to take the name of a built-in plugin (refused otherwise, so an
    # installed package cannot silently replace, say, meta_capi).
    replace_builtins: list[Name] = msgspec.field(default_factory=list)


class EventsConfig(ConfigStruct, frozen=True):
    allowed_names: Annotated[list[Name], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_EVENT_NAMES)
    )
    max_future_skew_s: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 300
    # Meta rejects the whole request for an event older than 7 days (subcode 2804003).
    max_age_s: Annotated[int, msgspec.Meta(ge=60, le=SEVEN_DAYS_S)] = SEVEN_DAYS_S
    # How long after the ad click a conversion still attributes (Meta: 7 days for CTWA).
    attribution_window_s: Annotated[int, msgspec.Meta(ge=60, le=90 * 86400)] = SEVEN_DAYS_S
    # A known eventId with a different body: "conflict" answers 409 naming the fields that
    # differ; "original" answers the original outcome (duplicate: true), as Zernio does.
    on_reused_event_id: Literal["conflict", "original"] = "conflict"


class WebhookConfig(ConfigStruct, frozen=True):
    # Unset: the handshake answers 403 and every notification 503 (fail closed, Meta retries).
    verify_token_env: EnvName | None = None
    app_secret_env: EnvName | None = None
    # Meta batches up to 1,000 updates in one POST: 280 kB of short messages half of which
    # carry an ad referral (bench/webhook.py), about 1.5 MB if each also had a long referral
    # (image URLs, ad body) and a contact. 3 MiB leaves headroom over that; every unsigned
    # body may be this large, so a larger limit is more memory an anonymous client can ask for.
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 3 * 1024 * 1024
    # The most bytes of notifications being received at once, counted as they are read: the
    # signature covers the body, so until it is whole, whoever sent it is unknown. Past it,
    # 503 with Retry-After (Meta retries). 32 MiB: ten bodies of the largest size, a hundred
    # of 1,000 updates.
    max_bytes_in_flight: Annotated[int, msgspec.Meta(ge=1024, le=1024 * 1024 * 1024)] = (
        32 * 1024 * 1024
    )
    # How long message ids are kept for deduplication (Meta retries for up to 7 days) and
    # for linking automatic events to their conversation.
    message_retention_days: Annotated[int, msgspec.Meta(ge=8, le=3650)] = 30
    # Every signed notification is stored as received (so no click id is lost to a part we
    # could not process, and `webhooks reprocess` can run it again). Off only on purpose.
    archive: bool = True
    archive_retention_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 30


class SecretsConfig(ConfigStruct, frozen=True):
    # An env file (NAME=value lines) whose values override the environment's; read at start
    # and on SIGHUP, so keys and tokens can change without a restart.
    file: str | None = None


class MetricsConfig(ConfigStruct, frozen=True):
    # The bearer key /metrics requires. Unset, /metrics is open, which the gateway allows on
    # a loopback address only, unless `public = true` says it is meant to be.
    key_env: EnvName | None = None
    public: bool = False


class LoggingConfig(ConfigStruct, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class RetentionConfig(ConfigStruct, frozen=True):
    """How long each kind of data is kept; housekeeping prunes past it in small batches."""

    # A conversation without a click, from its last message (or creation).
    conversations_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 90
    # A captured click, past the attribution window: its fields are cleared (the conversation
    # stays while it is active) and automatic click events are deleted.
    clicks_after_window_days: Annotated[int, msgspec.Meta(ge=0, le=3650)] = 30
    # Delivered (and dry-run) events with their attempts; daily counts are kept.
    delivered_events_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 90
    # Failed and expired events: longer, so they can be looked into and replayed.
    failed_events_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 365
    # Rows one prune transaction deletes at most: the writer is never held for long.
    batch_rows: Annotated[int, msgspec.Meta(ge=10, le=10_000)] = 500


class PrivacyConfig(ConfigStruct, frozen=True):
    # The secret that keys suppression digests (HMAC-SHA256): a stored digest cannot be
    # matched against a list of phone numbers without it. Unset: no suppression.
    suppression_key_env: EnvName | None = None
    # How often a running gateway reads suppressions another process recorded
    # (`ctwa-gateway erase --suppress`); its own take effect at once.
    suppressions_refresh_s: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 10.0


class ConsoleConfig(ConfigStruct, frozen=True):
    """The browser console at ``/console`` (sign in with an API key)."""

    enabled: bool = True
    # A session ends this long after sign-in, whatever the activity (the key may have been
    # revoked meanwhile; revoking it on SIGHUP ends its sessions at once anyway).
    session_ttl_s: Annotated[int, msgspec.Meta(ge=60, le=30 * 86400)] = 43200
    # Sessions live in the process's memory; past this many, the oldest session of the key
    # holding the most ends first.
    max_sessions: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    # Past this many sessions of one key, that key's own oldest ends: signing in again and
    # again with one key never ends another key's sessions.
    max_sessions_per_key: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 20


class Settings(ConfigStruct, frozen=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    accounts: list[AccountConfig] = msgspec.field(default_factory=list)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    plugins: PluginsConfig = msgspec.field(default_factory=PluginsConfig)
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)
    webhook: WebhookConfig = msgspec.field(default_factory=WebhookConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    secrets: SecretsConfig = msgspec.field(default_factory=SecretsConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    privacy: PrivacyConfig = msgspec.field(default_factory=PrivacyConfig)
    console: ConsoleConfig = msgspec.field(default_factory=ConsoleConfig)
    # The raw ``[plugins.<name>]`` tables; each plugin decodes its own into its Config Struct.
    plugin_tables: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    # Where the file was read from, for messages and for resolving relative paths.
    source: str = "<memory>"

    def account(self, account_id: str) -> AccountConfig | None:
        """Return the configured account with this id, if any."""
        for account in self.accounts:
            if account.id == account_id:
                return account
        return None

    def account_for_number(
        self, phone_number_id: str | None, waba_id: str | None
    ) -> AccountConfig | None:
        """Return the account a webhook change belongs to: by phone number id, else by WABA.

        The WABA id alone is used only when exactly one account has it (one WABA may hold
        several numbers, each its own account).
        """
        if phone_number_id:
            for account in self.accounts:
                if account.phone_number_id == phone_number_id:
                    return account
            return None
        matches = [a for a in self.accounts if a.waba_id == waba_id]
        return matches[0] if len(matches) == 1 else None

    def base_dir(self) -> Path:
        """Return the folder relative paths are taken from: the config file's."""
        return self._path(".")

    def store_path(self) -> Path:
        """Return the SQLite path, relative paths taken from the config file's folder."""
        return self._path(self.store.path)

    def uses_postgres(self) -> bool:
        """Tell whether the store is a PostgreSQL database rather than the SQLite file."""
        return self.store.url is not None or self.store.url_env is not None

    def store_url(self, environ: Mapping[str, str]) -> str:
        """Return the PostgreSQL URL: ``[store] url``, or the variable ``url_env`` names."""
        if self.store.url is not None:
            return self.store.url
        name = self.store.url_env
        assert name is not None, "store_url() on a SQLite store"
        value = environ.get(name, "")
        if not value.startswith(("postgresql://", "postgres://")):
            raise ConfigError(
                f"{name} (named by [store] url_env) must hold a postgresql:// URL"
                + ("; it is not set" if not value else "")
            )
        return value

    def secrets_file(self) -> Path | None:
        """Return the ``[secrets] file`` path, if one is configured."""
        return None if self.secrets.file is None else self._path(self.secrets.file)

    def _path(self, value: str) -> Path:
        path = Path(value)
        if path.is_absolute() or self.source == "<memory>":
            return path
        return Path(self.source).parent / path


def load_settings(path: str | Path) -> Settings:
    """Read and validate a config file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_settings(data, source=str(path))


def parse_settings(data: dict[str, Any], *, source: str = "<memory>") -> Settings:
    """Validate an already-parsed config mapping (what tests and ``load_settings`` use)."""
    data = dict(data)
    plugins = dict(data.get("plugins") or {})
    # Sub-tables of [plugins] belong to the plugins themselves; the lists stay ours.
    tables = {k: v for k, v in plugins.items() if isinstance(v, dict)}
    data["plugins"] = {k: v for k, v in plugins.items() if not isinstance(v, dict)}
    data["plugin_tables"] = tables
    data["source"] = source
    try:
        settings = msgspec.convert(data, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _check_references(settings)
    return settings


def _check_references(settings: Settings) -> None:
    """Check what one table says about another: ids unique, keys naming real accounts."""
    src = settings.source
    seen: set[str] = set()
    for i, account in enumerate(settings.accounts):
        if account.id in seen:
            raise ConfigError(
                f"{src}: duplicate account id {account.id!r} - at `$.accounts[{i}].id`"
            )
        seen.add(account.id)
    numbers: set[str] = set()
    for i, account in enumerate(settings.accounts):
        if account.phone_number_id in numbers:
            raise ConfigError(
                f"{src}: phone_number_id {account.phone_number_id!r} is used by two accounts"
                f" - at `$.accounts[{i}].phone_number_id`"
            )
        numbers.add(account.phone_number_id)
    names: set[str] = set()
    for i, key in enumerate(settings.auth.keys):
        if key.name in names:
            raise ConfigError(
                f"{src}: duplicate key name {key.name!r} - at `$.auth.keys[{i}].name`"
            )
        names.add(key.name)
        for j, account_id in enumerate(key.accounts):
            if account_id != "*" and account_id not in seen:
                raise ConfigError(
                    f"{src}: key {key.name!r} names unknown account {account_id!r}; "
                    f'use an id from [[accounts]] or "*" - at `$.auth.keys[{i}].accounts[{j}]`'
                )
    for i, proxy in enumerate(settings.server.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"{src}: {proxy!r} is not an IP address or CIDR, e.g. 127.0.0.1 or 10.0.0.0/8"
                f" - at `$.server.trusted_proxies[{i}]`"
            ) from None
    webhook = settings.webhook
    if webhook.archive_retention_days > webhook.message_retention_days:
        # Reprocessing relies on remembered message ids never to capture a message twice.
        raise ConfigError(
            f"{src}: archive_retention_days ({webhook.archive_retention_days}) must not exceed"
            f" message_retention_days ({webhook.message_retention_days}); raise the latter too"
            " - at `$.webhook.archive_retention_days`"
        )
    if webhook.max_bytes_in_flight < webhook.max_body_bytes:
        # A body of the largest size allowed would never be taken.
        raise ConfigError(
            f"{src}: max_bytes_in_flight ({webhook.max_bytes_in_flight}) must be at least"
            f" max_body_bytes ({webhook.max_body_bytes}) - at `$.webhook.max_bytes_in_flight`"
        )
    store = settings.store
    if store.url is not None and store.url_env is not None:
        raise ConfigError(f"{src}: set url or url_env, not both - at `$.store`")
    if store.url is not None:
        try:
            parts = urlsplit(store.url)
            parts.port  # noqa: B018 - parsing the port is what finds a bad one
        except ValueError:
            raise ConfigError(
                f"{src}: not a valid URL; write it as postgresql://user@host:5432/database"
                " - at `$.store.url`"
            ) from None
        if parts.password is not None or "password=" in parts.query.lower():
            raise ConfigError(
                f"{src}: the URL holds a password; put the whole URL in an environment"
                " variable and name it with url_env - at `$.store.url`"
            )
    if store.min_connections > store.max_connections:
        raise ConfigError(
            f"{src}: min_connections ({store.min_connections}) exceeds max_connections"
            f" ({store.max_connections}) - at `$.store.min_connections`"
        )
    for kind in ("resolvers", "normalizers", "sinks"):
        listed: list[str] = getattr(settings.plugins, kind)
        dupes = sorted({n for n in listed if listed.count(n) > 1})
        if dupes:
            raise ConfigError(f"{src}: {kind} lists {dupes[0]!r} twice - at `$.plugins.{kind}`")
    primary = settings.plugins.primary_sink
    if primary is not None and primary not in settings.plugins.sinks:
        raise ConfigError(
            f"{src}: primary_sink {primary!r} is not one of the sinks"
            f" ({', '.join(settings.plugins.sinks)}) - at `$.plugins.primary_sink`"
        )
