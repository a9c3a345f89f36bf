"""config.toml: the shipped sample loads, and every mistake names the file and the $.path."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_settings, parse_settings
from gateway.errors import ConfigError, Unauthorized
from gateway.http.auth import KeyRing
from gateway.plugin_manager import build_plugins

ROOT = Path(__file__).parent.parent


def test_shipped_config_loads_with_log_sink_and_demo_account() -> None:
    settings = load_settings(ROOT / "config.toml")
    assert settings.plugins.sinks == ["log"]
    assert [a.id for a in settings.accounts] == ["demo"]
    assert settings.store_path() == ROOT / "var" / "ctwa-gateway.sqlite3"
    assert [k.key_env for k in settings.auth.keys] == ["CTWA_DEMO_API_KEY"]
    build_plugins(settings)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[server]\nport = 'x'\n", "Expected `int`, got `str` - at `$.server.port`"),
        ("[server]\nprot = 1\n", "unknown field `prot` - at `$.server`"),
        ("[[accounts]]\nid = 'a'\nwaba_id = '1'\n", "missing required field `phone_number_id`"),
        (
            "[[accounts]]\nid='a'\nwaba_id='x1'\nphone_number_id='2'\n",
            "- at `$.accounts[0].waba_id`",
        ),
        ("[events]\nallowed_names = []\n", "- at `$.events.allowed_names`"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_errors_name_file_and_path(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: ")
    assert words in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_settings(tmp_path / "nope.toml")


ACCOUNT = {"id": "a", "waba_id": "1", "phone_number_id": "2"}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"accounts": [ACCOUNT, ACCOUNT]}, "duplicate account id 'a' - at `$.accounts[1].id`"),
        (
            {"accounts": [ACCOUNT, {**ACCOUNT, "id": "b"}]},
            "phone_number_id '2' is used by two accounts",
        ),
        (
            {
                "accounts": [ACCOUNT],
                "auth": {"keys": [{"name": "k", "key_env": "K", "accounts": ["zz"]}]},
            },
            "unknown account 'zz'",
        ),
        ({"plugins": {"sinks": ["log", "log"]}}, "sinks lists 'log' twice"),
        (
            {"webhook": {"max_body_bytes": 4096, "max_bytes_in_flight": 4095}},
            "must be at least max_body_bytes (4096) - at `$.webhook.max_bytes_in_flight`",
        ),
        (
            {"auth": {"keys": [{"name": "k", "key_env": "not valid", "accounts": ["*"]}]}},
            "$.auth.keys[0].key_env",
        ),
    ],
)
def test_cross_references(data: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    assert words in str(info.value)


def test_secrets_come_from_the_environment() -> None:
    settings = parse_settings(
        {"auth": {"keys": [{"name": "k", "key_env": "MY_KEY", "accounts": ["*"]}]}}
    )
    with pytest.raises(ConfigError, match="MY_KEY is not set"):
        KeyRing.from_config(settings.auth, {})
    with pytest.raises(ConfigError, match="shorter than 16"):
        KeyRing.from_config(settings.auth, {"MY_KEY": "short"})
    ring = KeyRing.from_config(settings.auth, {"MY_KEY": "a-long-enough-secret-key"})
    assert ring.authenticate("Bearer a-long-enough-secret-key").name == "k"


def test_a_key_ring_remembers_only_tokens_that_matched() -> None:
    # A matched token is looked up, not hashed again; what an attacker sends is never kept
    # (nothing they send can grow the process), and near misses stay refused.
    settings = parse_settings(
        {"auth": {"keys": [{"name": "k", "key_env": "MY_KEY", "accounts": ["*"]}]}}
    )
    ring = KeyRing.from_config(settings.auth, {"MY_KEY": "a-long-enough-secret-key"})
    for i in range(1000):
        with pytest.raises(Unauthorized):
            ring.authenticate(f"Bearer a-long-enough-secret-ke{i}")
    for _ in range(3):
        assert ring.authenticate("Bearer  a-long-enough-secret-key ").name == "k"
    with pytest.raises(Unauthorized):
        ring.authenticate("Bearer a-long-enough-secret-kex")
    assert len(ring._matched) == 1


def test_the_readme_configuration_block_loads() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Configuration") :]
    block = section[
        section.index("```toml\n") + 8 : section.index("```", section.index("```toml") + 7)
    ]
    settings = parse_settings(tomllib.loads(block))
    assert settings.metrics.key_env == "CTWA_METRICS_KEY"
    assert settings.server.trusted_proxies == []
