"""Normalizer: ``event_time`` as integer Unix seconds, the request's or now."""

from __future__ import annotations

import math

from gateway import ConversionRequest, EventDraft, hookimpl


@hookimpl
def gateway_normalize_event(draft: EventDraft, request: ConversionRequest, now: float) -> None:
    # Meta wants an integer; flooring never moves an event into the future.
    when = request.event_time if request.event_time is not None else now
    draft.event["event_time"] = math.floor(when)
