"""Composing plugins from config: lookup, roles, order, and the mistakes caught at startup."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web

from gateway import Conversation, ConversionRequest, EventDraft, SinkState, hookimpl
from gateway.config import parse_settings
from gateway.errors import ConfigError
from gateway.http.app import create_app, startup_problems
from gateway.http.keys import PLUGINS
from gateway.plugin_manager import build_plugins, builtin_plugin_names
from gateway.runtime import running
from tests.conftest import ENV, ClientFactory, LogCapture, install_distribution


def settings_with(config: dict[str, Any], **plugins: Any) -> Any:
    return parse_settings({**config, "plugins": plugins})


class Tagger:
    def __init__(self, value: str) -> None:
        self.value = value

    @hookimpl
    def gateway_normalize_event(self, draft: EventDraft) -> None:
        draft.custom_data["tag"] = self.value


def run_normalizers(plugins: Any, settings: Any) -> EventDraft:
    request = ConversionRequest(
        account_id="acme", event_name="LeadSubmitted", event_id="e", conversation_id="c"
    )
    conversation = Conversation(id="c", account_id="acme", wa_id="1", created_at=0, ctwa_clid="x")
    draft = EventDraft()
    plugins.normalize(draft, request, settings.accounts[0], conversation, time.time())
    return draft


@pytest.mark.parametrize(("first", "last"), [("a", "b"), ("b", "a")])
def test_normalizers_run_in_listed_order(config: dict[str, Any], first: str, last: str) -> None:
    settings = settings_with(config, normalizers=["business_messaging", "event_time", first, last])
    plugins = build_plugins(settings, extra={"a": Tagger("A"), "b": Tagger("B")})
    assert run_normalizers(plugins, settings).custom_data["tag"] == last.upper()


class ArgumentSpy:
    """Each per-request hook declaring every argument of its spec, last first: what it is
    handed, by name, must be what the host passed for that name."""

    def __init__(self) -> None:
        self.got: dict[str, dict[str, Any]] = {}

    @hookimpl
    def gateway_resolve_conversation(
        self, config: Any, store: Any, account: Any, request: Any
    ) -> None:
        self.got["resolve"] = {
            "config": config,
            "store": store,
            "account": account,
            "request": request,
        }

    @hookimpl
    def gateway_normalize_event(
        self, config: Any, now: Any, conversation: Any, account: Any, request: Any, draft: Any
    ) -> None:
        self.got["normalize"] = {
            "config": config, "now": now, "conversation": conversation,
            "account": account, "request": request, "draft": draft,
        }  # fmt: skip

    @hookimpl
    def gateway_accept_event(self, config: Any, event: Any) -> SinkState:
        self.got["accept"] = {"config": config, "event": event}
        return SinkState(status="dry_run")

    @hookimpl
    def gateway_deliver_event(self, config: Any, sink: Any, state: Any, event: Any) -> None:
        self.got["deliver"] = {"config": config, "sink": sink, "state": state, "event": event}


async def test_per_request_hooks_get_each_argument_by_its_name(config: dict[str, Any]) -> None:
    settings = settings_with(
        config, resolvers=["spy"], normalizers=["business_messaging", "spy"], sinks=["spy"]
    )
    spy = ArgumentSpy()
    plugins = build_plugins(settings, extra={"spy": spy})
    spied = plugins.config("spy")
    account = settings.accounts[0]
    request = ConversionRequest(account_id="acme", event_name="LeadSubmitted", event_id="e")
    store, draft, event, now = object(), EventDraft(), object(), 12.5
    conversation = Conversation(id="c", account_id="acme", wa_id="1", created_at=0)
    assert await plugins.resolve(request, account, store) is None  # type: ignore[arg-type]
    plugins.normalize(draft, request, account, conversation, now)
    plugins.accept(event)  # type: ignore[arg-type]
    state = SinkState(status="dry_run")
    stored = SimpleNamespace(deliveries={"spy": state}, event_id="e")
    plugins.deliver(stored)  # type: ignore[arg-type]
    assert spy.got == {
        "resolve": {"config": spied, "store": store, "account": account, "request": request},
        "normalize": {
            "config": spied,
            "now": now,
            "conversation": conversation,
            "account": account,
            "request": request,
            "draft": draft,
        },
        "accept": {"config": spied, "event": event},
        "deliver": {"config": spied, "sink": "spy", "state": state, "event": stored},
    }


class PartialFailure:
    """A sink whose accept declares one of its hook's two arguments, and fails."""

    @hookimpl
    def gateway_accept_event(self, event: Any) -> SinkState:
        raise RuntimeError("boom")


def test_a_failing_hook_s_traceback_names_the_plugin(
    config: dict[str, Any], logs: LogCapture
) -> None:
    settings = settings_with(config, sinks=["partial"])
    plugins = build_plugins(settings, extra={"partial": PartialFailure()})
    request = ConversionRequest(account_id="acme", event_name="LeadSubmitted", event_id="e")
    states = plugins.accept(SimpleNamespace(request=request))  # type: ignore[arg-type]
    assert states["partial"].status == "failed"
    (line,) = logs.events("sink_failed")
    frames = [f["filename"] for f in line["exception"][0]["frames"]]
    # The frame between the gateway and the plugin says which hook of which plugin it is.
    assert "<gateway_accept_event of plugin 'partial'>" in frames


def test_unknown_plugin_is_named(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        build_plugins(settings_with(config, sinks=["metaa"]))
    message = str(info.value)
    assert "unknown plugin 'metaa' in [plugins] sinks" in message
    assert "built-ins: " in message
    assert "log" in message


def test_invalid_plugin_name(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="not a valid name"):
        build_plugins(settings_with(config, sinks=["../etc"]))


def test_builtins_are_listed() -> None:
    names = builtin_plugin_names()
    assert {"log", "test_mode", "conversation_id", "phone", "email"} <= set(names)


def test_misspelled_hook_fails_at_startup(config: dict[str, Any]) -> None:
    class Typo:
        @hookimpl
        def gateway_normalise_event(self, draft: EventDraft) -> None: ...

    with pytest.raises(ConfigError, match="gateway_normalise_event"):
        build_plugins(settings_with(config, sinks=["log", "typo"]), extra={"typo": Typo()})


def test_plugin_in_a_role_it_does_not_implement(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="listed in \\[plugins\\] sinks but implements none"):
        build_plugins(settings_with(config, sinks=["email"]))


def test_async_resolver_is_refused(config: dict[str, Any]) -> None:
    class Eager:
        @hookimpl
        async def gateway_resolve_conversation(self) -> None: ...

    with pytest.raises(ConfigError, match="must be a plain def"):
        build_plugins(settings_with(config, resolvers=["eager"]), extra={"eager": Eager()})


class LateChecks:
    """A sink whose other hooks are async def: they would never run (or report a coroutine)."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    @hookimpl
    def gateway_accept_event(self) -> None: ...


@pytest.mark.parametrize("hook", ["gateway_check_config", "gateway_check_ready"])
def test_async_hooks_of_any_kind_are_refused(config: dict[str, Any], hook: str) -> None:
    async def body(self: Any) -> None: ...

    late = type("Late", (LateChecks,), {hook: hookimpl(body)})(hook)
    with pytest.raises(ConfigError, match=f"{hook}.*must be a plain def"):
        build_plugins(settings_with(config, sinks=["late"]), extra={"late": late})


def test_settings_for_a_plugin_without_config(config: dict[str, Any]) -> None:
    settings = parse_settings({**config, "plugins": {"email": {"x": 1}}})
    with pytest.raises(ConfigError, match="plugin 'email' takes no settings"):
        build_plugins(settings)


def test_normalizers_missing_the_essentials_stop_startup(config: dict[str, Any]) -> None:
    settings = settings_with(config, normalizers=["email"])
    with pytest.raises(ConfigError, match="left out event_name, event_time"):
        create_app(settings, build_plugins(settings), environ=ENV)


def test_a_normalizer_leaking_raw_pii_stops_startup(config: dict[str, Any]) -> None:
    class Leaky:
        @hookimpl
        def gateway_normalize_event(self, draft: EventDraft, request: ConversionRequest) -> None:
            draft.user_data["em"] = request.email

    settings = settings_with(config, normalizers=["business_messaging", "event_time", "leaky"])
    with pytest.raises(ConfigError, match=r"user_data\.em is not a SHA-256"):
        create_app(settings, build_plugins(settings, extra={"leaky": Leaky()}), environ=ENV)


class MissingFile:
    @hookimpl
    def gateway_accept_event(self) -> None: ...

    @hookimpl
    def gateway_check_config(self) -> None:
        open("/nonexistent/ctwa/mapping.csv").close()


def test_a_plugins_own_error_in_its_check_is_one_line_naming_it(config: dict[str, Any]) -> None:
    settings = settings_with(config, sinks=["crm"])
    plugins = build_plugins(settings, extra={"crm": MissingFile()})
    with pytest.raises(ConfigError, match=r"plugin 'crm': gateway_check_config failed"):
        plugins.check_config(settings, ENV)
    # check-config lists it among its problems instead of a traceback.
    assert any("plugin 'crm'" in p for p in startup_problems(settings, plugins, ENV))


class BothKinds:
    @hookimpl
    def gateway_send_events(self, events: list[Any]) -> Any:
        return None

    @hookimpl
    def gateway_deliver_event(self) -> None:
        return None


def test_a_sink_is_an_outbox_sink_or_an_immediate_one(config: dict[str, Any]) -> None:
    settings = parse_settings({**config, "plugins": {"sinks": ["both"]}})
    with pytest.raises(ConfigError, match="implements both gateway_send_events"):
        build_plugins(settings, extra={"both": BothKinds()})


class Broken:
    """A plugin whose hook ``where`` raises, with personal data in the message."""

    def __init__(self, where: str) -> None:
        self.where = where

    def _maybe(self, hook: str) -> None:
        if self.where == hook:
            raise RuntimeError("no CRM record for jane.doe@example.com / +1 650 555 0123")

    @hookimpl
    def gateway_lifespan(self) -> AbstractAsyncContextManager[None]:
        self._maybe("lifespan")
        return self._running()

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        self._maybe("lifespan_start")
        yield

    @hookimpl
    def gateway_register_routes(self) -> list[web.RouteDef]:
        self._maybe("routes")
        return [web.get("/healthz", self.handler)] if self.where == "clash" else []

    async def handler(self, request: web.Request) -> web.Response:
        return web.Response(text="mine")

    @hookimpl
    def gateway_send_events(self, events: list[Any]) -> Any:
        return None

    @hookimpl
    def gateway_delivery_options(self) -> Any:
        self._maybe("options")
        return {"batch_max": 5} if self.where == "options_type" else None


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("lifespan", r"plugin 'broken': gateway_lifespan failed \(RuntimeError: no CRM record"),
        ("lifespan_start", r"plugin 'broken': gateway_lifespan \(starting\) failed"),
        ("routes", r"plugin 'broken': gateway_register_routes failed"),
        ("clash", r"plugin 'broken': its route GET /healthz is already served by the gateway"),
        ("options", r"plugin 'broken': gateway_delivery_options failed"),
        ("options_type", r"gateway_delivery_options returned dict, not a DeliveryOptions"),
    ],
)
async def test_a_plugin_failing_at_startup_is_one_line_without_personal_data(
    make_client: ClientFactory, config: dict[str, Any], where: str, message: str
) -> None:
    settings = parse_settings({**config, "plugins": {"sinks": ["log", "broken"]}})

    async def start() -> None:
        if where.startswith("lifespan"):
            # What the app's startup runs (``serve`` prints the error as one line, exit 2).
            plugins = build_plugins(settings, extra={"broken": Broken(where)})
            async with running(settings, plugins, ENV):
                pass
        else:
            await make_client(settings=settings, extra={"broken": Broken(where)})

    with pytest.raises(ConfigError, match=message) as caught:
        await start()
    assert "jane.doe@example.com" not in str(caught.value)
    assert "650 555 0123" not in str(caught.value)


class NotReady:
    @hookimpl
    def gateway_check_ready(self) -> str | None:
        raise KeyError("session")

    @hookimpl
    def gateway_reload_secrets(self) -> list[str]:
        raise KeyError("token")

    @hookimpl
    def gateway_deliver_event(self) -> None:
        return None


async def test_a_failing_readiness_or_reload_hook_is_contained(
    make_client: ClientFactory, config: dict[str, Any], logs: LogCapture
) -> None:
    settings = parse_settings({**config, "plugins": {"sinks": ["shaky", "log"]}})
    client = await make_client(settings=settings, extra={"shaky": NotReady()})
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503  # not a 500
    assert body["details"]["checks"] == {
        "shaky": "its readiness check failed (KeyError; see the log)"
    }
    plugins = client.app[PLUGINS]
    assert plugins.reload_secrets(settings, ENV) == []  # the others would still be asked
    assert logs.events("plugin_reload_failed")


def test_a_plugin_failing_to_load_is_one_line_without_personal_data(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "boom_plugin.py").write_text(
        "def make_plugin(config):\n"
        "    raise RuntimeError('no CRM record for jane.doe@example.com / +1 650 555 0123')\n"
    )
    install_distribution(site, monkeypatch, "boom", {"boom": "boom_plugin"})
    settings = parse_settings({**config, "plugins": {"sinks": ["log", "boom"]}})
    with pytest.raises(ConfigError, match=r"plugin 'boom': make_plugin failed \(RuntimeError") as e:
        build_plugins(settings)
    assert "jane.doe@example.com" not in str(e.value)
    assert "650 555 0123" not in str(e.value)
