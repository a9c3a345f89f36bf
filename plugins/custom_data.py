"""Normalizer: ``custom_data`` with ``value``, ``currency`` (upper case) and ``content_ids``."""

from __future__ import annotations

from gateway import ConversionRequest, EventDraft, hookimpl


@hookimpl
def gateway_normalize_event(draft: EventDraft, request: ConversionRequest) -> None:
    if request.currency is not None:
        draft.custom_data["currency"] = request.currency.strip().upper()
    if request.value is not None:
        # + 0 makes a negative zero, which JSON and the value's check (>= 0) let through, a
        # plain zero: Meta is sent no sign on a value.
        draft.custom_data["value"] = request.value + 0
    if request.content_ids:
        draft.custom_data["content_ids"] = [c.strip() for c in request.content_ids]
