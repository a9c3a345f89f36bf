"""The built-in sinks: ``log`` (dry run) and ``test_mode`` (forced test event code)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import parse_settings
from gateway.errors import ConfigError
from gateway.http.app import create_app
from gateway.plugin_manager import build_plugins
from tests.conftest import AUTH, CLID, ENV, ClientFactory, add_conversation, store_of


def lead(conversation_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "accountId": "acme",
        "eventName": "LeadSubmitted",
        "eventId": "L1",
        "conversationId": conversation_id,
        **extra,
    }


async def test_log_sink_writes_the_payload_once(make_client: ClientFactory, logs: Any) -> None:
    client = await make_client()
    conversation = await add_conversation(store_of(client))
    resp = await client.post("/v1/whatsapp/conversions", json=lead(conversation.id), headers=AUTH)
    body = await resp.json()
    (line,) = logs.events("dry_run_payload")
    assert line["sink"] == "log"
    assert line["account"] == "acme"
    assert line["event_id"] == "L1"
    assert line["payload"] == body["payload"]
    assert line["payload"]["data"][0]["user_data"]["ctwa_clid"] == CLID


@pytest.mark.parametrize("table", [{}, {"test_event_code": "  "}])
def test_test_mode_refuses_to_start_without_a_code(
    config: dict[str, Any], table: dict[str, Any]
) -> None:
    settings = parse_settings({**config, "plugins": {"sinks": ["test_mode"], "test_mode": table}})
    with pytest.raises(ConfigError, match=r"\$\.plugins\.test_mode\.test_event_code"):
        create_app(settings, build_plugins(settings), environ=ENV)
