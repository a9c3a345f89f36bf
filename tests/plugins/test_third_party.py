"""An integrator's plugin, installed through a real entry point, adds a normalizer and a sink."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import Conversation, ConversionRequest, EventDraft
from gateway.config import parse_settings
from gateway.errors import ConfigError
from gateway.plugin_manager import build_plugins
from tests.conftest import AUTH, ClientFactory, add_conversation, install_distribution, store_of


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Install a distribution whose entry point names ``acme`` in the ``ctwa_gateway`` group."""
    install_distribution(
        tmp_path / "site", monkeypatch, "acme-ctwa", {"acme": "tests.plugins.acme_ctwa"}
    )


def acme_config(config: dict[str, Any], outbox: Path) -> dict[str, Any]:
    return {
        **config,
        "plugins": {
            "normalizers": ["business_messaging", "event_time", "email", "acme"],
            "sinks": ["log", "acme"],
            "primary_sink": "acme",
            "acme": {"channel": "wa-store", "outbox": str(outbox)},
        },
    }


@pytest.mark.usefixtures("installed")
async def test_entry_point_plugin_normalizes_and_delivers(
    make_client: ClientFactory, config: dict[str, Any], tmp_path: Path
) -> None:
    outbox = tmp_path / "acme.jsonl"
    client = await make_client(settings=parse_settings(acme_config(config, outbox)))
    conversation = await add_conversation(store_of(client))

    resp = await client.post(
        "/v1/whatsapp/conversions",
        json={
            "accountId": "acme",
            "eventName": "LeadSubmitted",
            "eventId": "L1",
            "conversationId": conversation.id,
        },
        headers=AUTH,
    )

    body = await resp.json()
    assert resp.status == 200, body
    # Its normalizer ran: the field is in what the log sink would send...
    assert body["payload"]["data"][0]["custom_data"] == {"acme_channel": "wa-store"}
    # ...and its sink delivered and reported back, kept apart from the log sink's state.
    assert {d["sink"]: d["status"] for d in body["deliveries"]} == {
        "log": "dry_run",
        "acme": "delivered",
    }
    assert body["status"] == "delivered"
    assert body["eventsReceived"] == 1
    assert body["traceId"] == "acme-1"
    written = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert [w["event_id"] for w in written] == ["L1"]
    stored = await store_of(client).find_event("acme", "L1")
    assert stored is not None
    assert stored.deliveries["acme"].status == "delivered"


@pytest.mark.usefixtures("installed")
def test_plugin_settings_errors_name_the_path(config: dict[str, Any], tmp_path: Path) -> None:
    raw = acme_config(config, tmp_path / "x")
    raw["plugins"]["acme"] = {"channel": 5, "outbox": "x"}
    with pytest.raises(ConfigError, match=r"\$\.plugins\.acme\.channel"):
        build_plugins(parse_settings(raw))


@pytest.mark.usefixtures("installed")
def test_plugin_listed_only_as_sink_does_not_normalize(
    config: dict[str, Any], tmp_path: Path
) -> None:
    raw = acme_config(config, tmp_path / "x")
    raw["plugins"]["normalizers"] = ["business_messaging", "event_time"]
    settings = parse_settings(raw)
    plugins = build_plugins(settings)
    assert "acme" in plugins.sink_names
    request = ConversionRequest(
        account_id="acme", event_name="LeadSubmitted", event_id="e", conversation_id="c"
    )
    conversation = Conversation(id="c", account_id="acme", wa_id="1", created_at=0, ctwa_clid="x")
    draft = EventDraft()
    plugins.normalize(draft, request, settings.accounts[0], conversation, time.time())
    assert "acme_channel" not in draft.custom_data
    assert draft.user_data["ctwa_clid"] == "x"
