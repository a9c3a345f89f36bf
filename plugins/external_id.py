"""Normalizer: ``user_data.external_id``, lowercased and SHA-256 hashed."""

from __future__ import annotations

from gateway import ConversionRequest, EventDraft, hash_external_id, hookimpl


@hookimpl
def gateway_normalize_event(draft: EventDraft, request: ConversionRequest) -> None:
    if request.external_id is not None:
        draft.user_data["external_id"] = hash_external_id(request.external_id)
