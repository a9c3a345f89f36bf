"""Normalizer: ``event_time`` as integer Unix seconds, the request's or now."""

from __future__ import annotations

import math

from gateway import ConversionRequest, EventDraft, hookimpl


@hookimpl
def gateway_normalize_event(draft: EventDraft, request: ConversionRequest, now: float) -> None:
    # Meta answers 200 for an event dated in the future and then throws it away (a warning,
    # events_received 0). Validation lets a client whose clock runs ahead by up to
    # max_future_skew_s through; its conversion happened no later than now, so it is sent as
    # now. Meta wants an integer; flooring never moves an event into the future.
    when = now if request.event_time is None else min(request.event_time, now)
    draft.event["event_time"] = math.floor(when)
