"""Sink: like a real send, but every event carries the configured ``test_event_code``.

Events sent with a test code show up in Events Manager's "Test events" tab and never count as
conversions, so a new integration can be exercised safely. Until the Meta sink exists this
records a dry run (like ``log``) with that code forced into the body.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from gateway import ConfigError, PreparedEvent, Settings, SinkState, StoredEvent, hookimpl
from gateway.meta_body import DEFAULT_PARTNER_AGENT
from plugins.log import dry_run_state, log_payload


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    test_event_code: Annotated[str, msgspec.Meta(max_length=64)] = ""
    partner_agent: str = DEFAULT_PARTNER_AGENT


@hookimpl
def gateway_check_config(config: Config, settings: Settings) -> None:
    if not config.test_event_code.strip():
        raise ConfigError(
            f"{settings.source}: the test_mode sink needs a test event code: set"
            " `test_event_code` (from Events Manager > Test events) at"
            " `$.plugins.test_mode.test_event_code`"
        )


@hookimpl
def gateway_accept_event(event: PreparedEvent, config: Config) -> SinkState:
    return dry_run_state(
        event, partner_agent=config.partner_agent, test_event_code=config.test_event_code
    )


@hookimpl
def gateway_deliver_event(event: StoredEvent, state: SinkState) -> None:
    log_payload("test_mode", event, state.payload)
