"""A third-party plugin, written as an integrator would: outside ``gateway/``, found by name.

It adds a normalizer (tags every event with the integrator's channel) and a sink (appends each
event to a JSON-lines file and reports it delivered). Registered through an entry point in
``test_third_party.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from gateway import EventDraft, PreparedEvent, SinkState, StoredEvent, hookimpl


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    channel: str
    outbox: str


class AcmePlugin:
    def __init__(self, config: Config) -> None:
        self.outbox = Path(config.outbox)
        self.channel = config.channel

    @hookimpl
    def gateway_normalize_event(self, draft: EventDraft) -> None:
        draft.custom_data["acme_channel"] = self.channel

    @hookimpl
    def gateway_accept_event(self, event: PreparedEvent) -> SinkState:
        return SinkState(status="pending")

    @hookimpl
    def gateway_deliver_event(self, event: StoredEvent) -> Any:
        return self._write(event)

    async def _write(self, event: StoredEvent) -> SinkState:
        with self.outbox.open("a") as out:
            out.write(json.dumps({"event_id": event.event_id, "event": event.event}) + "\n")
        # The host stores the state the sink reports.
        return SinkState(status="delivered", attempts=1, events_received=1, trace_id="acme-1")


def make_plugin(config: Config) -> AcmePlugin:
    return AcmePlugin(config)
