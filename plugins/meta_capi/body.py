"""The request body Meta's ``/{dataset_id}/events`` takes, built the same way by every sink."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_PARTNER_AGENT", "meta_request_body"]

DEFAULT_PARTNER_AGENT = "ctwa-gateway"


def meta_request_body(
    events: Sequence[dict[str, Any]], *, partner_agent: str, test_event_code: str | None
) -> dict[str, Any]:
    """Return ``{"data": [...], "partner_agent": ..., "test_event_code": ...}``.

    ``test_event_code`` is request-level at Meta, so events with different codes never share
    a body.
    """
    body: dict[str, Any] = {"data": list(events), "partner_agent": partner_agent}
    if test_event_code:
        body["test_event_code"] = test_event_code
    return body
