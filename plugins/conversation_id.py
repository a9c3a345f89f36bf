"""Resolver: the conversation whose id the request names (``conversationId``), on its account."""

from __future__ import annotations

from collections.abc import Awaitable

from gateway import AccountConfig, Conversation, ConversionRequest, NotFound, Store, hookimpl


async def _lookup(store: Store, account: AccountConfig, conversation_id: str) -> Conversation:
    conversation = await store.get_conversation(account.id, conversation_id)
    if conversation is None:
        raise NotFound(
            f"Conversation {conversation_id!r} not found on account {account.id!r}; send an id"
            " from GET /v1/whatsapp/conversations, or identify the person by `phoneE164` or"
            " `businessScopedUserId` instead.",
            code="conversation_not_found",
            param="conversationId",
        )
    return conversation


@hookimpl
def gateway_declare_fields() -> list[str]:
    return ["conversationId"]


@hookimpl
def gateway_resolve_conversation(
    request: ConversionRequest, account: AccountConfig, store: Store
) -> Awaitable[Conversation] | None:
    if request.conversation_id is None:
        return None
    return _lookup(store, account, request.conversation_id)
