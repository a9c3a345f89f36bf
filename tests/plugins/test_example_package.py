"""The example plugin package (``examples/ctwa-acme-crm``), installed as an integrator would.

Its ``crm_csv`` resolver and ``http_sink`` outbox sink are found through the ``ctwa_gateway``
entry points of the installed distribution, and run next to the real Meta sink against a fake
Graph API and a fake CRM webhook, both real aiohttp servers on loopback.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import Settings, parse_settings
from gateway.errors import ConfigError
from gateway.plugin_manager import build_plugins
from tests.conftest import (
    AUTH,
    ENV,
    ClientFactory,
    LogCapture,
    add_conversation,
    install_distribution,
    settle,
    sink_state_when,
    sink_states,
    store_of,
)
from tests.fake_graph import FakeGraph

Client = TestClient[web.Request, web.Application]
URL = "/v1/whatsapp/conversions"
CRM_TOKEN = "crm-token-0123456789"


@dataclass
class FakeCrm:
    """The CRM's webhook: answers from a script (then 200), records what it took."""

    script: list[str] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    # How long each request takes, and the most requests it had at once.
    delay_s: float = 0.0
    in_flight: int = 0
    most_at_once: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hooks/ctwa", self.hook)
        return app

    async def hook(self, request: web.Request) -> web.Response:
        self.calls += 1
        assert request.headers["Authorization"] == f"Bearer {CRM_TOKEN}"
        self.in_flight += 1
        self.most_at_once = max(self.most_at_once, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.Response:
        mode = self.script.pop(0) if self.script else "ok"
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "500":
            return web.Response(status=500, text="upstream down")
        if mode == "429":
            return web.Response(status=429, headers={"Retry-After": "0"})
        if mode == "400":
            return web.json_response({"error": "unknown field crm_id"}, status=400)
        body = await request.json()
        self.received.extend(body["events"])
        return web.json_response({"ok": True})

    def event_ids(self) -> list[str]:
        return [e["eventId"] for e in self.received]


@pytest.fixture(autouse=True)
def installed() -> None:
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group="ctwa_gateway")}
    assert {"crm_csv", "http_sink"} <= found.keys(), (
        "install the example package: pip install -e examples/ctwa-acme-crm (scripts/dev test does)"
    )
    assert found["http_sink"].dist is not None
    assert found["http_sink"].dist.name == "ctwa-acme-crm"


@pytest.fixture
def crm() -> FakeCrm:
    return FakeCrm()


@pytest.fixture
def graph() -> FakeGraph:
    return FakeGraph(tokens={"1234567890": "EAAG-acme-token-0123456789"})


@pytest.fixture
async def servers(aiohttp_server: Any, crm: FakeCrm, graph: FakeGraph) -> tuple[str, str]:
    crm_server: TestServer = await aiohttp_server(crm.app())
    graph_server: TestServer = await aiohttp_server(graph.app())
    return (
        str(crm_server.make_url("/hooks/ctwa")),
        str(graph_server.make_url("")).rstrip("/"),
    )


def settings_for(config: dict[str, Any], servers: tuple[str, str], folder: Path) -> Settings:
    """Settings as read from ``folder/gateway.toml`` (written too, for the command line)."""
    raw = raw_config(config, servers, folder)
    path = folder / "gateway.toml"
    path.write_text(tomli_w.dumps(raw))
    # The export's relative path is taken from the config file's folder.
    return parse_settings(raw, source=str(path))


def raw_config(config: dict[str, Any], servers: tuple[str, str], folder: Path) -> dict[str, Any]:
    crm_url, graph_url = servers
    (folder / "crm-export.csv").write_text("external_id,phone\nC-1001,+1 650 555 1234\n")
    return {
        **config,
        "plugins": {
            "resolvers": ["conversation_id", "crm_csv", "phone"],
            "sinks": ["http_sink", "meta_capi"],
            "crm_csv": {"path": "crm-export.csv"},
            "http_sink": {
                "url": crm_url,
                "token_env": "ACME_CRM_TOKEN",
                "timeout_s": 0.5,
                "delivery": {
                    "batch_max": 10,
                    "retry_base_s": 0.05,
                    "retry_cap_s": 0.3,
                    "respond_within_ms": 1000,
                    "poll_s": 0.1,
                },
            },
            "meta_capi": {
                "graph_url": graph_url,
                "retry_base_s": 0.05,
                "respond_within_ms": 2000,
            },
            "sink_timeout_s": 0.5,
        },
    }


ENVIRON = {**ENV, "ACME_CRM_TOKEN": CRM_TOKEN}


@pytest.fixture
async def crm_client(
    make_client: ClientFactory, config: dict[str, Any], servers: tuple[str, str], tmp_path: Path
) -> Client:
    """The app with the example package's plugins next to Meta (config file in tmp_path)."""
    settings = settings_for(config, servers, tmp_path)
    return await make_client(settings=settings, environ=ENVIRON)


def lead(event_id: str = "L1", **extra: Any) -> dict[str, Any]:
    return {"accountId": "acme", "eventName": "LeadSubmitted", "eventId": event_id, **extra}


async def test_resolves_by_crm_export_and_delivers_to_both(
    crm_client: Client, crm: FakeCrm, graph: FakeGraph
) -> None:
    client = crm_client
    conversation = await add_conversation(store_of(client), wa_id="16505551234")

    resp = await client.post(URL, json=lead(externalId="C-1001"), headers=AUTH)

    body = await resp.json()
    assert resp.status == 200, body
    # The CRM export found the conversation, and the answer says so.
    assert body["conversationId"] == conversation.id
    assert body["resolution"] == {
        "resolver": "crm_csv",
        "field": "externalId",
        "form": "crm_export",
    }
    # The answer waited for Meta (the primary sink) only; the CRM's copy follows.
    assert (body["status"], sink_states(body)["meta_capi"]["status"]) == ("delivered",) * 2
    detail = await settle(client, "L1")
    assert {name: s["status"] for name, s in sink_states(detail).items()} == {
        "http_sink": "delivered",
        "meta_capi": "delivered",
    }
    assert crm.event_ids() == ["L1"]
    assert crm.received[0]["event"]["user_data"]["external_id"]  # hashed, as Meta gets it
    assert graph.event_ids() == ["L1"]
    # Unknown to the CRM export: a 404 naming the field, nothing stored.
    resp = await client.post(URL, json=lead("L2", externalId="C-9"), headers=AUTH)
    body = await resp.json()
    assert resp.status == 404
    assert (body["code"], body["param"]) == ("conversation_not_found", "externalId")


async def test_a_failing_webhook_is_retried_while_meta_answers_alone(
    crm_client: Client, crm: FakeCrm, graph: FakeGraph
) -> None:
    client = crm_client
    conversation = await add_conversation(store_of(client))
    crm.script = ["500", "429", "500"]

    resp = await client.post(URL, json=lead(conversationId=conversation.id), headers=AUTH)

    body = await resp.json()
    # Zernio's fields are Meta's (the primary sink); the CRM's trouble is only in its state.
    assert resp.status == 200, body
    assert (body["status"], body["eventsReceived"], body["eventsFailed"]) == ("delivered", 1, 0)
    assert body["failures"] == []
    assert body["traceId"] == "fbtrace-1"
    assert sink_states(body)["http_sink"]["status"] == "pending"
    detail = await settle(client, "L1")
    assert {d["sink"]: d["status"] for d in detail["deliveries"]} == {
        "http_sink": "delivered",
        "meta_capi": "delivered",
    }
    crm_attempts = [
        (a["outcome"], a["errorCode"]) for a in detail["attempts"] if a["sink"] == "http_sink"
    ]
    assert crm_attempts == [
        ("retry", "http_500"),
        ("retry", "http_429"),
        ("retry", "http_500"),
        ("delivered", None),
    ]
    assert crm.event_ids() == ["L1"]
    assert graph.event_ids() == ["L1"]  # Meta exactly once
    text = await (await client.get("/metrics")).text()
    assert 'ctwa_events_outcome_total{account="acme",outcome="retry",sink="http_sink"} 3.0' in text


async def test_a_refused_event_fails_and_replays_from_another_process(
    crm_client: Client, tmp_path: Path, crm: FakeCrm
) -> None:
    client = crm_client
    conversation = await add_conversation(store_of(client))
    crm.script = ["400"]
    resp = await client.post(URL, json=lead(conversationId=conversation.id), headers=AUTH)
    assert (await resp.json())["status"] == "delivered"  # Meta's
    detail = await settle(client, "L1")
    crm_state = sink_states(detail)["http_sink"]
    assert crm_state["status"] == "failed"
    assert "HTTP 400" in crm_state["error"]
    assert "unknown field crm_id" in crm_state["error"]
    # The event needs attention (its detail says so); Zernio's history row stays Meta's.
    assert detail["status"] == "failed"
    history = await client.get(URL, params={"accountId": "acme"}, headers=AUTH)
    assert (await history.json())["events"][0]["status"] == "delivered"

    # The integrator fixes the webhook, then replays that sink only.
    config_file = tmp_path / "gateway.toml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "replay", "--config", str(config_file),
        "--account", "acme", "--status", "failed", "--sink", "http_sink",
        env={**os.environ, **ENVIRON},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "re-queued 1 deliveries" in out.decode()
    detail = await settle(client, "L1")
    assert {d["sink"]: d["status"] for d in detail["deliveries"]} == {
        "http_sink": "delivered",
        "meta_capi": "delivered",
    }
    assert crm.event_ids() == ["L1"]


async def test_a_hanging_webhook_is_cut_off_by_the_host_and_meta_delivers_once(
    make_client: ClientFactory,
    config: dict[str, Any],
    servers: tuple[str, str],
    tmp_path: Path,
    crm: FakeCrm,
    graph: FakeGraph,
    logs: LogCapture,
) -> None:
    raw = raw_config(config, servers, tmp_path)
    # The sink's own HTTP timeout is longer than the host's bound: the host's is what stops it.
    raw["plugins"]["http_sink"]["timeout_s"] = 30
    settings = parse_settings(raw, source=str(tmp_path / "gateway.toml"))
    client = await make_client(settings=settings, environ=ENVIRON)
    conversation = await add_conversation(store_of(client))
    crm.script = ["hang"]

    started = asyncio.get_running_loop().time()
    resp = await client.post(URL, json=lead(conversationId=conversation.id), headers=AUTH)

    body = await resp.json()
    assert resp.status == 200, body
    assert body["status"] == "delivered"
    assert asyncio.get_running_loop().time() - started < 2  # never the webhook's 30 s
    assert graph.event_ids() == ["L1"]
    (line,) = await logs.wait_for("sink_failed")
    assert (line["sink"], line["hook"]) == ("http_sink", "gateway_send_events")
    assert line["exception"]  # with its traceback
    # The failure is logged before its attempt is written: wait for the written state.
    crm_state = await sink_state_when(client, "L1", "http_sink", lambda s: s["error"] is not None)
    assert crm_state["status"] == "pending"
    assert crm_state["error"].startswith("will retry: the http_sink sink failed")
    assert "timed out" in crm_state["error"]


async def test_a_third_party_sink_gets_its_batches_whole_one_at_a_time(
    make_client: ClientFactory,
    config: dict[str, Any],
    servers: tuple[str, str],
    tmp_path: Path,
    crm: FakeCrm,
) -> None:
    # Splitting a batch per account and test code is what one Graph request can carry, not a
    # webhook's: it got one request per account of a batch, all at once, past the
    # max_in_flight it asked for (a destination that takes one request at a time, or counts
    # them, met a burst as wide as the batch's accounts).
    raw = raw_config(config, servers, tmp_path)
    raw["plugins"]["http_sink"]["delivery"] |= {"max_in_flight": 1, "respond_within_ms": 0}
    settings = parse_settings(raw, source=str(tmp_path / "gateway.toml"))
    client = await make_client(settings=settings, environ=ENVIRON)
    store = store_of(client)
    acme = await add_conversation(store)
    other = await add_conversation(store, account_id="other")
    crm.delay_s = 0.3
    # W takes the one slot; the rest, of both accounts and with a test code, wait for it.
    await client.post(URL, json=lead("W", conversationId=acme.id), headers=AUTH)
    await asyncio.gather(
        client.post(URL, json=lead("A1", conversationId=acme.id), headers=AUTH),
        client.post(URL, json=lead("A2", conversationId=acme.id, testCode="T1"), headers=AUTH),
        client.post(URL, json=lead("B1", conversationId=other.id, accountId="other"), headers=AUTH),
    )
    for _ in range(100):
        if len(crm.received) == 4:
            break
        await asyncio.sleep(0.05)
    assert sorted(crm.event_ids()) == ["A1", "A2", "B1", "W"]
    assert (crm.calls, crm.most_at_once) == (2, 1)


def test_a_missing_export_is_one_line_naming_the_plugin(
    config: dict[str, Any], servers: tuple[str, str], tmp_path: Path
) -> None:
    settings = settings_for(config, servers, tmp_path)
    (tmp_path / "crm-export.csv").unlink()
    plugins = build_plugins(settings)
    with pytest.raises(ConfigError, match=r"crm_csv: cannot read .*crm-export\.csv"):
        plugins.check_config(settings, ENVIRON)


def test_an_entry_point_may_not_shadow_a_built_in(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A package that names an entry point like the built-in log sink.
    install_distribution(
        tmp_path / "site", monkeypatch, "evil-log", {"log": "ctwa_acme_crm.http_sink"}
    )
    settings = parse_settings(config)
    with pytest.raises(ConfigError, match=r"evil-log installs an entry point .* named like the"):
        build_plugins(settings)
    # Said explicitly, it is the entry point that runs.
    table = {"url": "http://127.0.0.1:9"}
    raw = {**config, "plugins": {"sinks": ["log"], "replace_builtins": ["log"], "log": table}}
    plugins = build_plugins(parse_settings(raw))
    assert plugins.origins()["log"] == "entry point ctwa_acme_crm.http_sink"


def test_two_packages_naming_the_same_plugin_are_refused(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_distribution(tmp_path / "site", monkeypatch, "other-crm", {"http_sink": "other.sink"})
    raw = {**config, "plugins": {"sinks": ["http_sink"], "http_sink": {"url": "http://x"}}}
    with pytest.raises(ConfigError, match=r"two installed packages name an entry point"):
        build_plugins(parse_settings(raw))
