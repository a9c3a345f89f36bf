"""Resolver: the most recent conversation with a captured click id for ``phoneE164``.

If the phone has conversations but none with a click id, the most recent one is returned so the
caller hears the precise reason (422, no captured ``ctwa_clid``) rather than "not found".
"""

from __future__ import annotations

from collections.abc import Awaitable

from gateway import AccountConfig, Conversation, ConversionRequest, NotFound, Store, hookimpl
from gateway.normalize import normalize_phone


async def _lookup(store: Store, account: AccountConfig, wa_id: str) -> Conversation:
    conversation = await store.latest_conversation_for_phone(account.id, wa_id)
    if conversation is None:
        raise NotFound(
            f"No conversation with this phone number on account {account.id!r}; the person"
            " must have messaged the business's WhatsApp number first.",
            code="conversation_not_found",
            param="phoneE164",
        )
    return conversation


@hookimpl
def gateway_resolve_conversation(
    request: ConversionRequest, account: AccountConfig, store: Store
) -> Awaitable[Conversation] | None:
    if request.phone_e164 is None:
        return None
    wa_id = normalize_phone(request.phone_e164)
    if wa_id is None:
        return None
    return _lookup(store, account, wa_id)
