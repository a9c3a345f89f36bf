"""Normalizer: the request's ``testCode`` as Meta's request-level ``test_event_code``."""

from __future__ import annotations

from gateway import ConversionRequest, EventDraft, hookimpl


@hookimpl
def gateway_normalize_event(draft: EventDraft, request: ConversionRequest) -> None:
    if request.test_code is not None:
        draft.test_event_code = request.test_code
