"""The plugin API: the markers and every ``gateway_*`` hook, documented.

A plugin is a module (or an object returned by the module's ``make_plugin(config)`` or
``make_plugin(config, base_dir)``) with functions marked ``@hookimpl``. ``config.toml`` lists
plugins by name in three ordered lists, ``[plugins] resolvers``, ``normalizers`` and
``sinks``; the gateway calls a plugin's hooks only for the roles it is listed in, in the
listed order. A name is looked up among the ``ctwa_gateway`` entry points and the built-ins
in ``plugins/``; an entry point named like a built-in is refused unless
``[plugins] replace_builtins`` lists the name.

If the plugin module defines ``Config`` (a :class:`msgspec.Struct`), its ``[plugins.<name>]``
table is decoded into it at startup (errors name the ``$.path``) and passed to every hook as
``config``. Relative paths in it are the plugin's to resolve: ``base_dir`` (the config file's
folder) is what they are relative to. Arguments are passed by keyword: an implementation may
take only the ones it needs.

pluggy is synchronous, and every implementation must be a plain ``def`` (checked at startup)
except :func:`gateway_send_events`, whose result is always awaited (``async def`` is fine).
Hooks that may need I/O return ``None`` or an awaitable, and the spec says what the host
awaits; the host bounds every wait (``[plugins] sink_timeout_s``).

A sink is one of two kinds (implementing both hooks is refused at startup):

- an **outbox sink** implements :func:`gateway_send_events`: "send these events, tell me each
  outcome". The host commits a ``pending`` delivery with the event and runs a dispatcher that
  batches, retries with backoff, expires, records every attempt and supports ``replay``;
- an **immediate sink** implements :func:`gateway_deliver_event` and is done when it returns
  (the ``log`` sink writes a line).

Whatever a sink raises, or however long it hangs, it only changes that sink's own state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
from aiohttp import web

if TYPE_CHECKING:
    from gateway.config import AccountConfig, Settings
    from gateway.domain import (
        Conversation,
        DeliveryOptions,
        PreparedEvent,
        QueuedEvent,
        Resolved,
        SendOutcome,
        SinkState,
        StoredEvent,
    )
    from gateway.draft import EventDraft
    from gateway.metrics import Metrics
    from gateway.store.protocol import Store
    from gateway.wire import ConversionRequest

__all__ = ["PROJECT", "hookimpl", "hookspec"]

PROJECT = "ctwa_gateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def gateway_check_config(
    config: Any, settings: Settings, environ: Mapping[str, str], base_dir: Path, delivering: bool
) -> None:
    """Check this plugin's settings against the whole configuration at startup.

    Raise :class:`gateway.ConfigError` with a message naming the ``$.path`` to stop startup
    (e.g. ``test_mode`` without a ``test_event_code``, or an account whose token variable is
    unset). ``environ`` is where secrets come from; ``base_dir`` is the config file's folder.
    ``delivering`` is False when nothing will be delivered (``ctwa-gateway send --dry-run``,
    which only shows what would be sent): a sink then asks for no credentials.
    Any other exception stops startup too, as one line naming the plugin. Called once per
    listed plugin, also by ``ctwa-gateway check-config``.
    """


@hookspec
def gateway_lifespan(
    name: str,
    config: Any,
    settings: Settings,
    store: Store,
    environ: Mapping[str, str],
    metrics: Metrics,
    base_dir: Path,
) -> AbstractAsyncContextManager[None] | None:
    """Return an async context manager for the plugin's resources, or ``None``.

    The host enters it after the store is open and before the outbox dispatchers start and
    the app serves (open HTTP sessions, start tasks), and exits it on shutdown after the
    dispatchers stopped and before the store closes (drain them). ``name`` is the name the
    plugin is listed under; ``metrics`` is the app's :class:`gateway.metrics.Metrics` (its
    ``registry`` takes the plugin's own Prometheus metrics).
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
def gateway_register_routes(name: str, config: Any, sinks: list[str]) -> list[web.RouteDef] | None:
    """Return extra HTTP routes the plugin serves, or ``None``.

    ``sinks`` are the configured sinks, in order: a plugin that shares its routes with another
    (``test_mode`` the dataset endpoints with ``meta_capi``) serves them when that one is not
    configured.
    """


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
    """Say, before the event is stored, the state this sink starts it in (sinks; optional
    for an outbox sink, which starts every event ``pending``).

    Runs before the commit and must not do I/O. A dry-run sink answers ``dry_run`` with the
    ``payload`` it would send; an outbox sink answers ``pending`` to queue it. The state is
    committed together with the event, so an accepted event is never without its sinks'
    states. Raise a :class:`gateway.GatewayError` to refuse the request on purpose (a 4xx,
    e.g. an account without a dataset); anything else it raises fails this sink alone.
    """


@hookspec
def gateway_send_events(  # type: ignore[empty-body]
    events: list[QueuedEvent], sink: str, config: Any
) -> Awaitable[list[SendOutcome]]:
    """Send these events; resolve to one :class:`~gateway.SendOutcome` per event, in order
    (outbox sinks).

    Called by the host's dispatcher with a batch of up to ``batch_max`` due events of this
    sink, ``max_in_flight`` batches at once (see :func:`gateway_delivery_options`). With
    ``call_per_account`` a call holds one account's events of one ``test_event_code``
    instead: a batch of several is one call for each, at once, each call's outcomes recorded
    as soon as it returns. The sink decides how many requests a call takes. Each
    outcome is ``delivered``, ``retry`` (backoff, optionally ``retry_after_s`` and
    ``hold_account``) or ``failed`` with the reason and what to fix. Raising, hanging past the
    send timeout or returning the wrong number of outcomes holds that call's events back for
    ``retry_cap_s`` and is logged once with the traceback. An event is sent again only after a
    ``retry``, after such a fault (the receiver may have taken it before the sink failed to say
    so) or after a crash between the send and the recording of its outcome: send each event's
    ``event_id`` so the receiver can drop a repeat.
    """


@hookspec(firstresult=True)
def gateway_delivery_options(sink: str, config: Any) -> DeliveryOptions | None:
    """Return how the outbox drives this sink (batch size, backoff, expiry, waits), or ``None``
    for the defaults of :class:`~gateway.DeliveryOptions` (one event per call)."""


@hookspec
def gateway_deliver_event(
    event: StoredEvent, state: SinkState, sink: str, config: Any
) -> Awaitable[SinkState | None] | None:
    """Act on an event after it has been committed (immediate sinks; never for duplicates).

    Return ``None`` when there is nothing to do, or an awaitable the host awaits (at most
    ``[plugins] sink_timeout_s``) before it answers the request; it resolves to the sink's new
    :class:`~gateway.SinkState`, which the host stores and reports, or ``None`` if nothing
    changed. ``sink`` is the name the plugin is listed under. There is no retry here: a sink
    that needs one implements :func:`gateway_send_events` instead. A sink that raises, hangs
    or answers something else ends ``failed`` with the reason; the other sinks and the
    answer's status are not affected.
    """
    return None
