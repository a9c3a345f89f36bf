"""Sink: a dry run. The exact body that would be POSTed to Meta is recorded, not sent.

Nothing leaves the machine. The event is stored with status ``dry_run`` and the body, which
the answer and the event's history show, so an integration can be checked end to end before
a token exists. The body holds hashed fields only, like what Meta would receive. It is also
logged, at debug level: a line per event at info cost an eighth of a request's CPU, for what
the answer and the store already hold.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import structlog

from gateway import PreparedEvent, SinkState, StoredEvent, hookimpl
from plugins.meta_capi.body import DEFAULT_PARTNER_AGENT, meta_request_body

log = structlog.get_logger()


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    partner_agent: str = DEFAULT_PARTNER_AGENT


def dry_run_state(
    event: PreparedEvent, *, partner_agent: str, test_event_code: str | None
) -> SinkState:
    """Return the ``dry_run`` state carrying the body Meta would receive."""
    body = meta_request_body(
        [event.event], partner_agent=partner_agent, test_event_code=test_event_code
    )
    return SinkState(status="dry_run", payload=body)


def log_payload(sink: str, event: StoredEvent, payload: dict[str, Any] | None) -> None:
    """Write the dry-run line: ids and the hashed body, nothing raw."""
    log.debug(
        "dry_run_payload",
        sink=sink,
        account=event.account_id,
        event_id=event.event_id,
        conversation_id=event.conversation_id,
        payload=payload,
    )


@hookimpl
def gateway_accept_event(event: PreparedEvent, config: Config) -> SinkState:
    return dry_run_state(
        event, partner_agent=config.partner_agent, test_event_code=event.test_event_code
    )


@hookimpl
def gateway_deliver_event(event: StoredEvent, state: SinkState) -> None:
    # Asked of the configured class, not through the module's lazy logger (which binds a
    # logger to answer): a third of the cost, on every event; a call with its arguments
    # would cost more.
    if structlog.get_config()["wrapper_class"].is_enabled_for(None, logging.DEBUG):
        log_payload("log", event, state.payload)
