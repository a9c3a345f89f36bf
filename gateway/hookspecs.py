"""The plugin API: the markers and every ``gateway_*`` hook, documented.

A plugin is a module (or an object returned by the module's ``make_plugin(config)``) with
functions marked ``@hookimpl``. ``config.toml`` lists plugins by name in three ordered lists,
``[plugins] resolvers``, ``normalizers`` and ``sinks``; the gateway calls a plugin's hooks only
for the roles it is listed in, in the listed order. A name is looked up in the ``ctwa_gateway``
entry-point group first, then among the built-ins in ``plugins/``.

If the plugin module defines ``Config`` (a :class:`msgspec.Struct`), its ``[plugins.<name>]``
table is decoded into it at startup (errors name the ``$.path``) and passed to every hook as
``config``. Arguments are passed by keyword: an implementation may take only the ones it needs.

pluggy is synchronous. Hooks that may need I/O return ``None`` or an awaitable, and the spec
says what the host awaits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import pluggy
from aiohttp import web

if TYPE_CHECKING:
    from gateway.config import AccountConfig, Settings
    from gateway.domain import Conversation, PreparedEvent, Resolved, SinkState, StoredEvent
    from gateway.draft import EventDraft
    from gateway.metrics import Metrics
    from gateway.store.database import Store
    from gateway.wire import ConversionRequest

__all__ = ["PROJECT", "hookimpl", "hookspec"]

PROJECT = "ctwa_gateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def gateway_check_config(config: Any, settings: Settings, environ: Mapping[str, str]) -> None:
    """Check this plugin's settings against the whole configuration at startup.

    Raise :class:`gateway.errors.ConfigError` with a message naming the ``$.path`` to stop
    startup (e.g. ``test_mode`` without a ``test_event_code``, or an account whose token
    variable is unset). ``environ`` is where secrets come from. Called once per listed plugin.
    """


@hookspec
def gateway_lifespan(
    name: str,
    config: Any,
    settings: Settings,
    store: Store,
    environ: Mapping[str, str],
    metrics: Metrics,
) -> AbstractAsyncContextManager[None] | None:
    """Return an async context manager for the plugin's resources, or ``None``.

    The host enters it after the store is open and before serving (start sessions, background
    tasks), and exits it on shutdown before the store closes (drain them). ``name`` is the
    name the plugin is listed under; ``metrics`` is the app's :class:`gateway.metrics.Metrics`.
    """


@hookspec
def gateway_reload_secrets(
    name: str, config: Any, settings: Settings, environ: Mapping[str, str]
) -> list[str] | None:
    """Take new secrets on SIGHUP (a rotated access token); return what changed, or ``None``.

    Called only after :func:`gateway_check_config` passed with the same ``environ``, so the
    secrets the plugin needs are there. Swap them in without dropping work in flight.
    """


@hookspec
def gateway_check_ready(name: str, config: Any) -> str | None:
    """Return ``None`` if the plugin can do its work, or what stops it (``GET /readyz``)."""


@hookspec
def gateway_register_routes(name: str, config: Any) -> list[web.RouteDef] | None:
    """Return extra HTTP routes the plugin serves, or ``None``."""


@hookspec(firstresult=True)
def gateway_resolve_conversation(
    request: ConversionRequest, account: AccountConfig, store: Store, config: Any
) -> Awaitable[Conversation | Resolved] | None:
    """Find the conversation a conversion belongs to (resolvers, in configured order).

    Decide synchronously: return ``None`` if this resolver does not apply to the request (e.g.
    no ``conversationId``), so the next one is asked. Return an awaitable to claim it; the host
    awaits it, and it resolves to the :class:`~gateway.domain.Conversation` (or a
    :class:`~gateway.domain.Resolved` saying how it matched, which the answer shows and the
    event keeps) or raises :class:`gateway.errors.NotFound` naming the request field that found
    nothing. Whether the conversation has a ``ctwa_clid`` is the host's concern (422).
    """


@hookspec
def gateway_declare_fields(config: Any) -> list[str] | None:
    """Return the request fields (camelCase) a resolver finds conversations by.

    The host names them when no resolver applies ("send one of conversationId,
    businessScopedUserId, phoneE164") and in the 422 for a conversation without a click.
    """
    return None


@hookspec
def gateway_normalize_event(
    draft: EventDraft,
    request: ConversionRequest,
    account: AccountConfig,
    conversation: Conversation,
    now: float,
    config: Any,
) -> None:
    """Build the Meta event in ``draft`` (normalizers, in configured order), in place.

    ``draft.event`` is one element of Meta's ``data`` array; ``draft.user_data`` and
    ``draft.custom_data`` are its sub-objects; ``draft.test_event_code`` is the request-level
    code. Personal data must be hashed here: after the last normalizer the host refuses an
    event whose ``user_data`` carries an unhashed ``em``, ``ph`` or ``external_id``.
    """


@hookspec
def gateway_accept_event(event: PreparedEvent, config: Any) -> SinkState:  # type: ignore[empty-body]
    """Say, before the event is stored, the state this sink starts it in (sinks).

    Runs before the commit and must not do I/O. A dry-run sink answers ``dry_run`` with the
    ``payload`` it would send; a delivering sink answers ``pending``. The state is committed
    together with the event, so an accepted event is never without its sinks' states.
    """


@hookspec
def gateway_deliver_event(
    event: StoredEvent, state: SinkState, sink: str, store: Store, config: Any
) -> Awaitable[SinkState | None] | None:
    """Act on an event after it has been committed (sinks; never for duplicates).

    Return ``None`` when there is nothing to do, or an awaitable the host awaits before it
    answers the request; it resolves to the sink's current :class:`~gateway.domain.SinkState`,
    which the host reports, or ``None`` if nothing changed yet. The sink owns its delivery
    state from here: it stores changes itself (``store.update_deliveries`` or the outbox),
    so an outcome reached after the request was answered is kept too. ``sink`` is the name the
    plugin is listed under. The awaitable should bound its own wait; the host bounds it too
    (``[plugins] sink_timeout_s``). A sink that raises here or in
    :func:`gateway_accept_event` (anything but a :class:`~gateway.errors.GatewayError`
    refusing the request), or hangs past that bound, ends ``failed`` with the reason; the
    other sinks and the answer's status are not affected.
    """
    return None
