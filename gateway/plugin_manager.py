"""Build the PluginManager from config, and :class:`Plugins`, the only caller of ``pm.hook``.

Each plugin is called through a caller of its own, so a plugin runs only in the roles it is
listed in (a module that is both a normalizer and a sink but listed only as a sink never
normalizes) and in exactly the listed order, whatever the registration order.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import inspect
import operator
import pkgutil
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import pluggy
import structlog
from aiohttp import web

from gateway import hookspecs
from gateway.config import AccountConfig, Settings
from gateway.domain import (
    Conversation,
    DeliveryOptions,
    PreparedEvent,
    QueuedEvent,
    Resolution,
    Resolved,
    SendOutcome,
    SinkState,
    StoredEvent,
)
from gateway.draft import EventDraft
from gateway.errors import ConfigError, GatewayError
from gateway.logs import scrub
from gateway.metrics import Metrics
from gateway.store.protocol import Store
from gateway.wire import ConversionRequest, request_field

__all__ = [
    "ENTRY_POINT_GROUP",
    "Plugins",
    "build_plugins",
    "builtin_plugin_names",
    "is_plugin_fault",
    "plugin_error",
    "sink_fault",
]

log = structlog.get_logger()

ENTRY_POINT_GROUP = "ctwa_gateway"
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_ROLES = ("resolvers", "normalizers", "sinks")
_ROLE_HOOKS = {
    "resolvers": ("gateway_resolve_conversation",),
    "normalizers": ("gateway_normalize_event",),
    "sinks": ("gateway_accept_event", "gateway_send_events", "gateway_deliver_event"),
}
# Hooks whose result is always awaited: an async def is as good as a def returning a coroutine.
_ALWAYS_AWAITED = frozenset({"gateway_send_events"})
# The sinks whose outcome the answer reports by default, in order of preference.
_META_SINKS = ("meta_capi", "test_mode")


@dataclass(frozen=True)
class _Loaded:
    name: str
    plugin: object
    config: Any
    origin: str


def builtin_plugin_names() -> list[str]:
    """Return the names of the plugins shipped in ``plugins/``."""
    import plugins

    return sorted(m.name for m in pkgutil.iter_modules(plugins.__path__))


def _find(name: str, role: str, settings: Settings) -> tuple[object, str]:
    """Return the plugin object (module or entry-point target) for ``name``, and its origin."""
    if not _NAME.match(name):
        raise ConfigError(
            f"plugin name {name!r} in [plugins] {role} is not a valid name"
            " (lowercase letters, digits and underscores)"
        )
    found = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name))
    if len({ep.value for ep in found}) > 1:
        # Which one Python lists first is an accident of the install order.
        where = ", ".join(
            f"{ep.value} ({ep.dist.name if ep.dist else 'unknown package'})" for ep in found
        )
        raise ConfigError(
            f"plugin {name!r}: two installed packages name an entry point {name!r}: {where};"
            " uninstall one of them"
        )
    for ep in found:
        if name in builtin_plugin_names() and name not in settings.plugins.replace_builtins:
            dist = ep.dist.name if ep.dist is not None else "an installed package"
            raise ConfigError(
                f"plugin {name!r}: {dist} installs an entry point ({ep.value}) named like the"
                f" built-in {name!r}; list {name!r} in [plugins] replace_builtins to use it"
                " instead of the built-in, or uninstall that package"
            )
        try:
            return ep.load(), f"entry point {ep.value}"
        except Exception as exc:
            raise plugin_error(name, f"importing its entry point {ep.value}", exc) from None
    try:
        module = importlib.import_module(f"plugins.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"plugins.{name}":
            raise
        raise ConfigError(
            f"unknown plugin {name!r} in [plugins] {role}: no entry point named {name!r} in"
            f" group {ENTRY_POINT_GROUP!r} and no built-in of that name"
            f" (built-ins: {', '.join(builtin_plugin_names())})"
        ) from None
    return module, f"built-in plugins.{name}"


def _load(name: str, role: str, settings: Settings) -> _Loaded:
    target, origin = _find(name, role, settings)
    table = settings.plugin_tables.get(name, {})
    config_type = getattr(target, "Config", None)
    config: Any = None
    if config_type is not None:
        try:
            config = msgspec.convert(table, config_type)
        except msgspec.ValidationError as exc:
            text = str(exc).replace("`$", f"`$.plugins.{name}", 1)
            raise ConfigError(f"{settings.source}: plugin {name!r}: {text}") from None
    elif table:
        raise ConfigError(
            f"{settings.source}: plugin {name!r} takes no settings; remove [plugins.{name}]"
        )
    factory = getattr(target, "make_plugin", None)
    try:
        if not callable(factory):
            plugin = target
        elif len(inspect.signature(factory).parameters) >= 2:
            plugin = factory(config, settings.base_dir())
        else:
            plugin = factory(config)
    except Exception as exc:
        raise plugin_error(name, "make_plugin", exc) from None
    return _Loaded(name=name, plugin=plugin, config=config, origin=origin)


class Plugins:
    """Typed facade over the PluginManager: what the pipeline and the app call."""

    def __init__(
        self,
        pm: pluggy.PluginManager,
        loaded: list[_Loaded],
        roles: dict[str, list[str]],
        primary: str | None = None,
    ):
        self.pm = pm
        self._loaded = {item.name: item for item in loaded}
        self.roles = roles
        sinks = roles["sinks"]
        # Asked on every request: chosen once.
        fallback = sinks[0] if sinks else ""
        self._primary = primary or next((s for s in _META_SINKS if s in sinks), fallback)
        # The hooks every request calls take their arguments positionally (_hot).
        self._resolvers = [
            (n, call, self.config(n), self._declared(n))
            for n in roles["resolvers"]
            if (call := _hot(pm, n, "gateway_resolve_conversation"))
        ]
        self._normalizers = [
            (call, self.config(n))
            for n in roles["normalizers"]
            if (call := _hot(pm, n, "gateway_normalize_event"))
        ]
        self._accept = [
            (n, _hot(pm, n, "gateway_accept_event"), self.config(n)) for n in roles["sinks"]
        ]
        self._send = {
            n: call for n in roles["sinks"] if (call := _one(pm, n, "gateway_send_events"))
        }
        self._deliver = [
            (n, call, self.config(n))
            for n in roles["sinks"]
            if (call := _hot(pm, n, "gateway_deliver_event"))
        ]
        self._check = [
            (item.name, call, self.config(item.name))
            for item in loaded
            if (call := _one(pm, item.name, "gateway_check_config"))
        ]
        self._lifespans = [
            (item.name, call, self.config(item.name))
            for item in loaded
            if (call := _one(pm, item.name, "gateway_lifespan"))
        ]
        self._ready = [
            (item.name, call, self.config(item.name))
            for item in loaded
            if (call := _one(pm, item.name, "gateway_check_ready"))
        ]
        self._routes = [
            (item.name, call, self.config(item.name))
            for item in loaded
            if (call := _one(pm, item.name, "gateway_register_routes"))
        ]
        self._reload = [
            (item.name, call, self.config(item.name))
            for item in loaded
            if (call := _one(pm, item.name, "gateway_reload_secrets"))
        ]

    @property
    def sink_names(self) -> list[str]:
        return list(self.roles["sinks"])

    @property
    def outbox_sinks(self) -> list[str]:
        """The sinks that send through the host's outbox (``gateway_send_events``)."""
        return list(self._send)

    @property
    def primary_sink(self) -> str:
        """The sink whose outcome the Zernio-shaped answer reports."""
        return self._primary

    def sender(self, name: str) -> Callable[[list[QueuedEvent]], Awaitable[list[SendOutcome]]]:
        """Return a call of sink ``name``'s ``gateway_send_events``."""
        call, config = self._send[name], self.config(name)

        async def send(events: list[QueuedEvent]) -> list[SendOutcome]:
            result: list[SendOutcome] = await call(events=events, sink=name, config=config)
            return result

        return send

    def delivery_options(self, name: str) -> DeliveryOptions:
        """Return how the outbox drives sink ``name`` (its own say, else the defaults)."""
        call = _one(self.pm, name, "gateway_delivery_options")
        try:
            options = call(sink=name, config=self.config(name)) if call else None
        except Exception as exc:
            raise plugin_error(name, "gateway_delivery_options", exc) from None
        if options is None:
            return DeliveryOptions()
        if not isinstance(options, DeliveryOptions):
            raise ConfigError(
                f"plugin {name!r}: gateway_delivery_options returned"
                f" {type(options).__name__}, not a DeliveryOptions"
            )
        return options

    def config(self, name: str) -> Any:
        """Return the decoded ``[plugins.<name>]`` settings of a loaded plugin."""
        return self._loaded[name].config

    def origins(self) -> dict[str, str]:
        """Return where each loaded plugin came from (entry point or built-in)."""
        return {name: item.origin for name, item in self._loaded.items()}

    def check_config(
        self, settings: Settings, environ: Mapping[str, str], *, delivering: bool = True
    ) -> None:
        """Let every plugin check its settings (``delivering``: whether events will be
        sent, as :func:`~gateway.hookspecs.gateway_check_config` says); raises ConfigError
        naming the plugin, whatever the plugin raised (a missing file is one line, not a
        traceback)."""
        for name, call, config in self._check:
            try:
                call(
                    config=config,
                    settings=settings,
                    environ=environ,
                    base_dir=settings.base_dir(),
                    delivering=delivering,
                )
            except ConfigError:
                raise
            except Exception as exc:
                raise plugin_error(name, "gateway_check_config", exc) from None

    def lifespans(
        self, settings: Settings, store: Store, environ: Mapping[str, str], metrics: Metrics
    ) -> list[AbstractAsyncContextManager[None]]:
        """Return the plugins' resource lifetimes, in load order."""
        found: list[AbstractAsyncContextManager[None]] = []
        for name, call, config in self._lifespans:
            try:
                cm = call(
                    name=name,
                    config=config,
                    settings=settings,
                    store=store,
                    environ=environ,
                    metrics=metrics,
                    base_dir=settings.base_dir(),
                )
            except Exception as exc:
                raise plugin_error(name, "gateway_lifespan", exc) from None
            if cm is not None:
                found.append(_guarded(name, cm))
        return found

    def reload_secrets(self, settings: Settings, environ: Mapping[str, str]) -> list[str]:
        """Give every plugin the reloaded secrets; return what they say changed."""
        changed: list[str] = []
        for name, call, config in self._reload:
            try:
                said = call(name=name, config=config, settings=settings, environ=environ)
            except Exception as exc:
                # One plugin's bug must not keep the rotated secrets from the others.
                log.error("plugin_reload_failed", plugin=name, exc_info=exc)
                continue
            changed += [f"{name}.{what}" for what in said or []]
        return changed

    def readiness_problems(self) -> dict[str, str]:
        """Return, per plugin that is not ready, what stops it."""
        problems: dict[str, str] = {}
        for name, call, config in self._ready:
            try:
                problem = call(name=name, config=config)
            except Exception as exc:
                log.error("plugin_check_ready_failed", plugin=name, exc_info=exc)
                problem = f"its readiness check failed ({type(exc).__name__}; see the log)"
            if problem:
                problems[name] = str(problem)
        return problems

    def routes(self) -> list[tuple[str, web.RouteDef]]:
        """Return the routes plugins add, each with the plugin's name."""
        found: list[tuple[str, web.RouteDef]] = []
        for name, call, config in self._routes:
            try:
                routes = call(name=name, config=config, sinks=self.sink_names)
                found.extend((name, route) for route in routes or [])
            except Exception as exc:
                raise plugin_error(name, "gateway_register_routes", exc) from None
        return found

    def _declared(self, name: str) -> tuple[str, ...]:
        call = _one(self.pm, name, "gateway_declare_fields")
        return tuple(call(config=self.config(name)) or ()) if call else ()

    @property
    def resolver_fields(self) -> list[str]:
        """The request fields the configured resolvers find conversations by, in order."""
        return list(dict.fromkeys(f for *_, fields in self._resolvers for f in fields))

    async def resolve(
        self, request: ConversionRequest, account: AccountConfig, store: Store
    ) -> tuple[Conversation, Resolution] | None:
        """Ask the resolvers in order; ``None`` if none of them applies."""
        for name, call, config, fields in self._resolvers:
            found: Awaitable[Conversation | Resolved] | None = call(request, account, store, config)
            if found is None:
                continue
            result = await found
            if isinstance(result, Resolved):
                return result.conversation, Resolution(
                    resolver=name,
                    field=result.field,
                    form=result.form,
                    ambiguous=result.ambiguous,
                )
            sent = [f for f in fields if request_field(request, f) is not None]
            return result, Resolution(resolver=name, field=sent[0] if sent else None)
        return None

    def normalize(
        self,
        draft: EventDraft,
        request: ConversionRequest,
        account: AccountConfig,
        conversation: Conversation,
        now: float,
    ) -> None:
        """Run the normalizers in order over ``draft``."""
        for call, config in self._normalizers:
            call(draft, request, account, conversation, now, config)

    def accept(self, event: PreparedEvent) -> dict[str, SinkState]:
        """Return each sink's starting state for ``event``.

        A sink may refuse the request on purpose with a GatewayError (a 4xx, e.g. an account
        without a dataset); any other exception, or an answer that is not a SinkState, starts
        that sink ``failed`` with the reason: it never keeps the event from the other sinks.
        """
        states: dict[str, SinkState] = {}
        for name, call, config in self._accept:
            if call is None:
                # An outbox sink that does not say: every event waits in its outbox.
                if name in self._send:
                    states[name] = SinkState(status="pending")
                continue
            try:
                state = call(event, config)
                if not isinstance(state, SinkState):
                    raise TypeError(f"gateway_accept_event returned {type(state).__name__}")
            except GatewayError:
                raise
            except Exception as exc:
                state = sink_fault(name, "gateway_accept_event", exc, event.request.event_id)
            states[name] = state
        return states

    def deliver(
        self, event: StoredEvent
    ) -> tuple[dict[str, Awaitable[SinkState | None]], dict[str, SinkState]]:
        """Start each sink's delivery of a committed event; return what there is to await,
        and the sinks that failed to start (their state is ``failed``)."""
        pending: dict[str, Awaitable[SinkState | None]] = {}
        failed: dict[str, SinkState] = {}
        for name, call, config in self._deliver:
            state = event.deliveries.get(name)
            if state is None or state.status == "failed":
                continue
            try:
                result = call(event, state, name, config)
            except Exception as exc:
                failed[name] = sink_fault(name, "gateway_deliver_event", exc, event.event_id)
                continue
            if result is not None:
                pending[name] = result
        return pending, failed


def plugin_error(name: str, hook: str, exc: BaseException) -> ConfigError:
    """Return the one-line error that stops startup for a plugin's failing hook (its message
    scrubbed of personal data, cut short)."""
    if isinstance(exc, ConfigError):
        return exc
    return ConfigError(
        f"plugin {name!r}: {hook} failed ({type(exc).__name__}: {scrub(str(exc))[:200]})"
    )


# The longest a plugin's lifespan may take to start or to stop.
LIFESPAN_TIMEOUT_S = 60.0


@asynccontextmanager
async def _guarded(name: str, cm: AbstractAsyncContextManager[None]) -> AsyncIterator[None]:
    """Enter a plugin's lifespan with a bound, as a one-line error if it fails; leave it with
    a bound too, logging (not raising) what goes wrong, so shutdown always completes."""
    try:
        async with asyncio.timeout(LIFESPAN_TIMEOUT_S):
            await cm.__aenter__()
    except Exception as exc:
        raise plugin_error(name, "gateway_lifespan (starting)", exc) from None
    try:
        yield
    finally:
        try:
            async with asyncio.timeout(LIFESPAN_TIMEOUT_S):
                await cm.__aexit__(None, None, None)
        except Exception as exc:
            log.error("plugin_stop_failed", plugin=name, exc_info=exc)


def is_plugin_fault(exc: BaseException) -> bool:
    """Whether ``exc``, out of a plugin's code, is the plugin's own fault: any Exception, and a
    CancelledError it raised itself (the running task is not being cancelled: shutdown or a
    client gone away must still cancel)."""
    if isinstance(exc, Exception):
        return True
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and (task is None or task.cancelling() == 0)


def sink_fault(sink: str, hook: str, exc: BaseException, event_id: str) -> SinkState:
    """Log a sink's exception once, with its traceback, and return the failed state it leaves."""
    log.error("sink_failed", sink=sink, hook=hook, event_id=event_id, exc_info=exc)
    reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
    return SinkState(
        status="failed",
        error=f"the {sink} sink failed in {hook} ({reason}); see the gateway log",
        error_code="sink_error",
    )


def _implementation(
    pm: pluggy.PluginManager, name: str, hook: str
) -> tuple[Callable[..., Any], tuple[str, ...], tuple[str, ...]] | None:
    """Plugin ``name``'s implementation of ``hook``, the arguments it declares and those of
    the hook's spec (pluggy checked at registration that the first are among the second)."""
    caller = getattr(pm.hook, hook)
    impls = [i for i in caller.get_hookimpls() if i.plugin_name == name]
    if not impls:
        return None
    (impl,) = impls  # a plugin object holds one function per hook name
    return impl.function, tuple(impl.argnames), tuple(caller.spec.argnames)


def _one(pm: pluggy.PluginManager, name: str, hook: str) -> Callable[..., Any] | None:
    """Return a call of plugin ``name``'s implementation of ``hook`` taking the hook's
    arguments by keyword, or ``None``.

    Each role calls one plugin at a time, in configured order, so the call goes straight to
    the implementation with the arguments it declares, as pluggy's own loop does; going
    through a per-plugin subset hook caller cost ~10 us a call on the request path.
    """
    found = _implementation(pm, name, hook)
    if found is None:
        return None
    function, argnames, _ = found
    if not argnames:
        return lambda **_: function()
    pick = operator.itemgetter(*argnames)  # in C: the arguments it declares, in its order
    if len(argnames) == 1:
        return lambda **kwargs: function(pick(kwargs))
    return lambda **kwargs: function(*pick(kwargs))


def _hot(pm: pluggy.PluginManager, name: str, hook: str) -> Callable[..., Any] | None:
    """:func:`_one` for the hooks every request calls: the call takes the hook's arguments
    positionally, in its spec's order. Without a keyword dict to build and search, a call
    costs half as much (about 0.2 us less, a dozen calls a request)."""
    found = _implementation(pm, name, hook)
    if found is None:
        return None
    function, argnames, spec = found
    if argnames == spec:
        return function  # it takes every argument, in the spec's order: called as it is
    # A function with the spec's parameters that passes on the ones the implementation
    # declares, by name: half the cost of picking them out of *args at each call (about
    # 80 ns, ten calls a request). The names are the hookspec's (pluggy checked that the
    # implementation's are among them), so the text is made of identifiers only; the
    # implementation's own name is one that none of them is.
    hidden = "_implementation"
    while hidden in spec:
        hidden += "_"
    text = f"def call({', '.join(spec)}):\n    return {hidden}({', '.join(argnames)})"
    namespace: dict[str, Any] = {hidden: function}
    # Named in tracebacks as what it is: the frame between the gateway and the plugin.
    exec(compile(text, f"<{hook} of plugin {name!r}>", "exec"), namespace)  # noqa: S102
    call: Callable[..., Any] = namespace["call"]
    return call


def build_plugins(settings: Settings, *, extra: Mapping[str, object] | None = None) -> Plugins:
    """Load the plugins ``settings`` lists and return the facade; raises ConfigError.

    ``extra`` maps names to plugin objects that take precedence over the lookup; tests use it
    to add fakes without installing anything.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    roles = {role: list(getattr(settings.plugins, role)) for role in _ROLES}
    loaded: list[_Loaded] = []
    for role in _ROLES:
        for name in roles[role]:
            if pm.has_plugin(name):
                continue
            if extra and name in extra:
                item = _Loaded(name=name, plugin=extra[name], config=None, origin="given")
            else:
                item = _load(name, role, settings)
            pm.register(item.plugin, name=name)
            loaded.append(item)
    # A misspelled hook name in any plugin fails here, at startup, not at the first request.
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"plugin {exc.plugin!r}: {exc}") from None
    for role, hooks in _ROLE_HOOKS.items():
        for name in roles[role]:
            if not any(
                impl.plugin_name == name
                for hook in hooks
                for impl in getattr(pm.hook, hook).get_hookimpls()
            ):
                raise ConfigError(
                    f"plugin {name!r} is listed in [plugins] {role} but implements none of"
                    f" {', '.join(hooks)}"
                )
    for name in roles["sinks"]:
        kinds = [
            hook
            for hook in ("gateway_send_events", "gateway_deliver_event")
            if any(i.plugin_name == name for i in getattr(pm.hook, hook).get_hookimpls())
        ]
        if len(kinds) == 2:
            raise ConfigError(
                f"plugin {name!r} implements both gateway_send_events (an outbox sink) and"
                " gateway_deliver_event (an immediate sink); a sink is one or the other"
            )
    # Every hook, not only the role's: an async def gateway_check_config would never run, an
    # async def gateway_check_ready would report a coroutine.
    all_hooks = [h for h in dir(hookspecs) if h.startswith("gateway_")]
    for item in loaded:
        impls = [
            (hook, impl)
            for hook in all_hooks
            for impl in getattr(pm.hook, hook).get_hookimpls()
            if impl.plugin_name == item.name
        ]
        _check_sync(item.name, impls)
    plugins = Plugins(pm, loaded, roles, settings.plugins.primary_sink)
    for name in plugins.outbox_sinks:
        plugins.delivery_options(name)  # a bad answer stops startup (and check-config) here
    return plugins


def _check_sync(name: str, impls: list[tuple[str, pluggy.HookImpl]]) -> None:
    for hook, impl in impls:
        if impl.hookwrapper or impl.wrapper:
            raise ConfigError(
                f"plugin {name!r}: {hook} is a wrapper; gateway hooks call one plugin at a time,"
                " so wrappers have nothing to wrap"
            )
    # pluggy calls hooks synchronously: an async def on a "return None or an awaitable" hook
    # always claims the call (a coroutine is never None), and on any other hook its body
    # never runs. Refused at startup, rather than silently wrong every time.
    for hook, impl in impls:
        if inspect.iscoroutinefunction(impl.function) and hook not in _ALWAYS_AWAITED:
            raise ConfigError(
                f"plugin {name!r}: {hook} must be a plain def (returning None or an awaitable"
                " where its spec says so), not an async def"
            )
