"""Composing plugins from config: lookup, roles, order, and the mistakes caught at startup."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway import Conversation, ConversionRequest, EventDraft, hookimpl
from gateway.config import parse_settings
from gateway.errors import ConfigError
from gateway.http.app import create_app, startup_problems
from gateway.plugin_manager import build_plugins, builtin_plugin_names
from tests.conftest import ENV


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
    with pytest.raises(ConfigError, match=r"plugin 'crm': its configuration check failed"):
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
