"""Normalizer: ``user_data.em``, the email trimmed, lowercased and SHA-256 hashed."""

from __future__ import annotations

from gateway import ConversionRequest, EventDraft, hash_email, hookimpl


@hookimpl
def gateway_normalize_event(draft: EventDraft, request: ConversionRequest) -> None:
    if request.email is not None:
        draft.user_data["em"] = hash_email(request.email)
