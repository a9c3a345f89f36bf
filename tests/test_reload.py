"""SIGHUP: new API keys and access tokens without a restart, or the old ones kept."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.credentials import read_env_file
from gateway.errors import ConfigError
from gateway.store.database import SqliteStore
from tests.conftest import API_KEY, ENV, add_conversation, free_port
from tests.fake_graph import FakeGraph
from tests.live import start, write_config

NEW_KEY = "rotated-key-0123456789abcdef"
NEW_TOKEN = "EAAG-rotated-token-0123456789"
URL = "/v1/whatsapp/conversions"


def test_env_files_take_export_quotes_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "secrets.env"
    path.write_text("# rotated 2026-11-25\nexport A=one\nB='two words'\n\nC=\"x=y\"\n")
    path.chmod(0o600)
    assert read_env_file(path) == {"A": "one", "B": "two words", "C": "x=y"}
    path.write_text("A=1\nthis line holds a secret\n")
    with pytest.raises(ConfigError, match="line 2 is not NAME=value") as raised:
        read_env_file(path)
    assert "secret" not in str(raised.value).split(":")[-1]


async def wait_for(log: Path, event: str, count: int = 1) -> None:
    for _ in range(200):
        if log.read_text().count(f'"event":"{event}"') >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {event} in the log: {log.read_text()[-2000:]}")


async def test_sighup_rotates_keys_and_tokens_and_refuses_bad_ones(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    db = tmp_path / "reload.sqlite3"
    store = await SqliteStore.open(db)
    conversation = await add_conversation(store)
    await store.close()
    # Meta only takes the rotated token; the running gateway starts with the old one.
    fake = FakeGraph(tokens={"1234567890": NEW_TOKEN})
    graph: TestServer = await aiohttp_server(fake.app())
    port = free_port()
    config = tmp_path / "gateway.toml"
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"CTWA_TEST_KEY={API_KEY}\n")
    secrets.chmod(0o600)
    write_config(config, db, port, str(graph.make_url("")).rstrip("/"))
    text = config.read_text().replace('level = "warning"', 'level = "info"')
    config.write_text(text + f'\n[secrets]\nfile = "{secrets}"\n')
    log = tmp_path / "server.log"
    proc = await start(config, port, log)
    base = f"http://127.0.0.1:{port}"
    body = {"accountId": "acme", "eventName": "LeadSubmitted", "eventId": "rot-1",
            "conversationId": conversation.id}  # fmt: skip
    try:
        async with aiohttp.ClientSession(base) as session:
            old = {"Authorization": f"Bearer {API_KEY}"}
            new = {"Authorization": f"Bearer {NEW_KEY}"}
            async with session.post(URL, json=body, headers=old) as resp:
                answer = await resp.json()
            assert answer["status"] == "failed"
            assert "SIGHUP" in answer["failures"][0]["message"]

            secrets.write_text(f"CTWA_TEST_KEY={NEW_KEY}\nCTWA_ACME_TOKEN={NEW_TOKEN}\n")
            proc.send_signal(signal.SIGHUP)
            await wait_for(log, "secrets_reloaded")
            async with session.get(URL, params={"accountId": "acme"}, headers=old) as resp:
                assert resp.status == 401
            async with session.get(URL, params={"accountId": "acme"}, headers=new) as resp:
                assert resp.status == 200
            # The failed event goes out with the new token once replayed.
            replay = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "replay", "--config", str(config),
                "--account", "acme", env={**os.environ, **ENV},
            )  # fmt: skip
            assert await replay.wait() == 0
            for _ in range(100):
                if fake.event_ids():
                    break
                await asyncio.sleep(0.05)
            assert fake.event_ids() == ["rot-1"]

            # A reload that would not pass startup's checks keeps what runs.
            secrets.write_text("CTWA_TEST_KEY=short\n")
            proc.send_signal(signal.SIGHUP)
            await wait_for(log, "secrets_reload_refused")
            async with session.get(URL, params={"accountId": "acme"}, headers=new) as resp:
                assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    text = log.read_text()
    for secret in (NEW_KEY, NEW_TOKEN, API_KEY, "short"):
        assert f"={secret}" not in text
        assert f'"{secret}"' not in text
