"""Shared fixtures: a real app on a real store, with logs captured as JSON lines.

The store is a SQLite file; in a module that sets ``BOTH_ENGINES = True`` every test that uses
the app (or the ``engine`` fixture) runs twice, on SQLite and on a fresh PostgreSQL database
(tests/pg_fixtures.py: a throwaway server from the pgserver wheel, or
``CTWA_TEST_POSTGRES_URL``)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import Settings, parse_settings
from gateway.domain import Conversation, new_conversation_id
from gateway.http.app import create_app
from gateway.http.keys import PIPELINE
from gateway.logs import configure_logging
from gateway.plugin_manager import build_plugins
from gateway.store.database import SqliteStore, Store

API_KEY = "test-key-0123456789abcdef"
SCOPED_KEY = "scoped-key-0123456789abcdef"
APP_SECRET = "test-app-secret-0123456789"
ACME_TOKEN = "EAAG-acme-token-0123456789"
OTHER_TOKEN = "EAAG-other-token-0123456789"
VERIFY_TOKEN = "test-verify-token"
ENV = {
    "CTWA_TEST_KEY": API_KEY,
    "CTWA_SCOPED_KEY": SCOPED_KEY,
    "CTWA_APP_SECRET": APP_SECRET,
    "CTWA_VERIFY_TOKEN": VERIFY_TOKEN,
    "CTWA_ACME_TOKEN": ACME_TOKEN,
    "CTWA_OTHER_TOKEN": OTHER_TOKEN,
}
WABA_ID = "102290129340398"
PHONE_NUMBER_ID = "106540352242922"
# The click id of Meta's documented CTWA message example (../shared/fixtures).
CLID = (
    "Aff-n8ZTODiE79d22KtAwQKj9e_mIEOOj27vDVwFjN80dp4_0NiNhEgpGo0AHemvuSoifXaytfTzcchptiErTKCqTrJ"
    "5nW1h7IHYeYymGb5K5J5iTROpBhWAGaIAeUzHL50"
)
AUTH = {"Authorization": f"Bearer {API_KEY}"}

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


pytest_plugins = ["tests.pg_fixtures"]

# How many cases each fuzzer ran (tests/test_fuzz.py), printed after the run.
FUZZ_CASES = pytest.StashKey[dict[str, int]]()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    cases = config.stash.get(FUZZ_CASES, None)
    if cases:
        counts = ", ".join(f"{name} {count}" for name, count in sorted(cases.items()))
        terminalreporter.write_line(f"fuzz cases run: {counts}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_config(db: Path) -> dict[str, Any]:
    """Return a config mapping like config.toml's, on ``db``."""
    return {
        "store": {"path": str(db)},
        "accounts": [
            {
                "id": "acme",
                "waba_id": WABA_ID,
                "phone_number_id": PHONE_NUMBER_ID,
                "dataset_id": "1234567890",
                "access_token_env": "CTWA_ACME_TOKEN",
            },
            {
                "id": "other",
                "waba_id": "200000000000001",
                "phone_number_id": "300000000000001",
                "dataset_id": "2222222222",
                "access_token_env": "CTWA_OTHER_TOKEN",
            },
        ],
        "auth": {
            "keys": [
                {"name": "admin", "key_env": "CTWA_TEST_KEY", "accounts": ["*"]},
                {"name": "scoped", "key_env": "CTWA_SCOPED_KEY", "accounts": ["other"]},
            ]
        },
        "plugins": {"sinks": ["log"]},
        "webhook": {"verify_token_env": "CTWA_VERIFY_TOKEN", "app_secret_env": "CTWA_APP_SECRET"},
    }


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sqlite_only(why): in a BOTH_ENGINES module, a test of what only SQLite has (its"
        " file, WAL, PRAGMAs); runs once, on SQLite",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if (
        "engine" in metafunc.fixturenames
        and getattr(metafunc.module, "BOTH_ENGINES", False)
        and metafunc.definition.get_closest_marker("sqlite_only") is None
    ):
        metafunc.parametrize("engine", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The store's engine: "sqlite", or both in a module with ``BOTH_ENGINES = True``."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite3"


@pytest.fixture
def config(db_path: Path, engine: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    settings = base_config(db_path)
    if engine == "postgresql":
        settings["store"] = {"url": request.getfixturevalue("pg_url")}
    return settings


class LogCapture:
    """The JSON log lines written during a test."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    async def wait_for(self, name: str, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """Return the lines of event ``name`` once there is one (something in the background
        logs it), or fail after ``timeout_s``."""
        for _ in range(int(timeout_s / 0.02)):
            found = self.events(name)
            if found:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {name!r} log line within {timeout_s} s")


@pytest.fixture(autouse=True)
def logs() -> LogCapture:
    capture = LogCapture()
    configure_logging("debug", "json", stream=capture.stream, cache=False)
    return capture


@pytest.fixture
def make_client(aiohttp_client: Any, config: dict[str, Any]) -> ClientFactory:
    """Return a factory: ``await make_client(**config overrides)`` -> client on the real app."""

    async def factory(
        *,
        settings: Settings | None = None,
        extra: dict[str, object] | None = None,
        environ: dict[str, str] | None = None,
        **overrides: Any,
    ) -> TestClient[web.Request, web.Application]:
        if settings is None:
            settings = parse_settings({**config, **overrides})
        plugins = build_plugins(settings, extra=extra)
        app = create_app(settings, plugins, environ=ENV if environ is None else environ)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        return client

    return factory


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient[web.Request, web.Application]:
    return await make_client()


@pytest.fixture
async def seeded(
    make_client: ClientFactory, config: dict[str, Any]
) -> TestClient[web.Request, web.Application]:
    """A client on the app with tests/console_seed.py's known numbers, delivering through
    meta_capi at an address nothing listens on (a replayed delivery stays pending)."""
    from tests.console_seed import seed  # console_seed imports this module

    plugins = {"sinks": ["meta_capi"], "meta_capi": {"graph_url": "http://127.0.0.1:9"}}
    client = await make_client(settings=parse_settings({**config, "plugins": plugins}))
    await seed(store_of(client))
    return client


def install_distribution(
    site: Path, monkeypatch: pytest.MonkeyPatch, name: str, entry_points: dict[str, str]
) -> None:
    """Make ``site`` hold an installed distribution ``name`` with these ``ctwa_gateway`` entry
    points (plugin name -> module), and put it on the path: importlib.metadata finds it as
    it finds anything pip installed."""
    dist = site / f"{name.replace('-', '_')}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{plugin} = {module}\n" for plugin, module in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[ctwa_gateway]\n{lines}")
    monkeypatch.syspath_prepend(str(site))


async def settle(
    client: TestClient[web.Request, web.Application], event_id: str, account: str = "acme"
) -> dict[str, Any]:
    """Poll the event until no sink is pending; return its detail."""
    url = f"/v1/whatsapp/conversions/{event_id}"
    for _ in range(200):
        resp = await client.get(url, params={"accountId": account}, headers=AUTH)
        detail: dict[str, Any] = await resp.json()
        if detail["status"] != "pending":
            return detail
        await asyncio.sleep(0.05)
    raise AssertionError(f"{event_id} still pending: {detail}")


async def event_detail(
    client: TestClient[web.Request, web.Application], event_id: str, account: str = "acme"
) -> dict[str, Any]:
    """Return ``GET /v1/whatsapp/conversions/{event_id}``'s answer."""
    url = f"/v1/whatsapp/conversions/{event_id}"
    resp = await client.get(url, params={"accountId": account}, headers=AUTH)
    detail: dict[str, Any] = await resp.json()
    return detail


def sink_states(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return an answer's ``deliveries`` by sink."""
    return {d["sink"]: d for d in answer["deliveries"]}


async def sink_state_when(
    client: TestClient[web.Request, web.Application],
    event_id: str,
    sink: str,
    done: Callable[[dict[str, Any]], bool],
    timeout_s: float = 5.0,
) -> dict[str, Any]:
    """Return a sink's state of the event once ``done`` holds (or at the timeout): the
    dispatcher logs a sink's failure before it writes the failed attempt to the store."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = sink_states(await event_detail(client, event_id))[sink]
        if done(state) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.02)


def store_of(client: TestClient[web.Request, web.Application]) -> Store:
    """Return the store of the app behind ``client``."""
    return client.app[PIPELINE].store


async def db_rows(
    client: TestClient[web.Request, web.Application], sql: str, *params: Any
) -> list[tuple[Any, ...]]:
    """Run a query (``?`` placeholders) on the app's store, whichever its engine; return its
    rows as tuples. Booleans come back as 0/1 on SQLite and False/True on PostgreSQL, which
    compare equal."""
    store = client.app[PIPELINE].store
    return [tuple(row) for row in await store.query(sql, params)]


def sqlite_store_of(client: TestClient[web.Request, web.Application]) -> SqliteStore:
    """Return the store of the app behind ``client``, which a test needs to be SQLite's."""
    store = client.app[PIPELINE].store
    assert isinstance(store, SqliteStore)
    return store


async def add_conversation(
    store: Store,
    *,
    account_id: str = "acme",
    wa_id: str = "16505551234",
    clid: str | None = CLID,
    last_inbound_at: float | None = None,
    bsuid: str | None = None,
    superseded_by: str | None = None,
) -> Conversation:
    """Store a conversation as the webhook would (one live conversation per phone and BSUID:
    give earlier ones of the same person ``superseded_by``)."""
    now = time.time()
    return await store.add_conversation(
        Conversation(
            id=new_conversation_id(),
            account_id=account_id,
            wa_id=wa_id,
            bsuid=bsuid,
            superseded_by=superseded_by,
            created_at=now,
            last_inbound_at=last_inbound_at or now,
            ctwa_clid=clid,
            ctwa_captured_at=now if clid else None,
            ctwa_clicked_at=now if clid else None,
            ctwa_source_id="120226305854810726" if clid else None,
            ctwa_source_type="ad" if clid else None,
        )
    )


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    opened = await SqliteStore.open(db_path)
    yield opened
    await opened.close()


# -- a real gateway process on loopback, one per test module that asks for it ----------


@dataclass
class Live:
    url: str
    log: Path
    cases: dict[str, int]


def request(
    live: Live, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, bytes]:
    # S310: the URL is the loopback server this module started.
    req = urllib.request.Request(live.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    config = base_config(folder / "fuzz.sqlite3")
    config["server"] = {"host": "127.0.0.1", "port": port}
    config["logging"] = {"format": "json", "level": "info"}
    config["metrics"] = {"key_env": "CTWA_SCOPED_KEY"}  # so /metrics checks a key too
    # The fuzzers fail authentication thousands of times from one address, on purpose.
    config["auth"] = {**config["auth"], "failed_per_s": 1000, "failed_burst": 100_000}
    path = folder / "gateway.toml"
    path.write_bytes(tomli_w.dumps(config).encode())
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            env={**os.environ, **ENV}, stdout=out, stderr=out,
        )  # fmt: skip
    # Shared with conftest's terminal summary, which reports how many cases ran.
    live = Live(f"http://127.0.0.1:{port}", log, pytestconfig.stash.setdefault(FUZZ_CASES, {}))
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(live.url + "/healthz", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield live
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # Nothing the fuzzers sent may have surfaced as an unhandled error.
    # Split on \n only: JSON strings may hold U+2028 and friends, which splitlines() breaks on.
    text = log.read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.split("\n") if line.startswith("{")]
    assert not [line for line in lines if line.get("event") == "unhandled_error"]
    assert proc.returncode == 0
