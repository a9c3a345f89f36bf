"""Resolver: the conversation whose id the request names (``conversationId``), on its account.

A conversation merged into another (the person's phone and BSUID had each started one) keeps
its id but never receives messages again; named without a click id of its own, it answers
with the one that took over, where the person's click is (not across a recycled number: the
number's new owner is someone else).
"""

from __future__ import annotations

from collections.abc import Awaitable

from gateway import AccountConfig, ConversionRequest, NotFound, Resolved, Store, hookimpl

FIELD = "conversationId"
# Links followed from a superseded conversation (as the store's lookups follow them).
_MAX_SUCCESSION = 16


async def _lookup(store: Store, account: AccountConfig, conversation_id: str) -> Resolved:
    conversation = await store.get_conversation(account.id, conversation_id)
    if conversation is None:
        raise NotFound(
            f"Conversation {conversation_id!r} not found on account {account.id!r}; send an id"
            " from GET /v1/whatsapp/conversations, or identify the person by `phoneE164` or"
            " `businessScopedUserId` instead.",
            code="conversation_not_found",
            param=FIELD,
        )
    successor = conversation
    for _ in range(_MAX_SUCCESSION):
        if (
            successor.ctwa_clid is not None
            or successor.superseded_by is None
            or successor.phone_released_at is not None
        ):
            break
        following = await store.get_conversation(account.id, successor.superseded_by)
        if following is None:
            break
        successor = following
    if successor is not conversation and successor.ctwa_clid is not None:
        return Resolved(conversation=successor, field=FIELD, form="successor")
    return Resolved(conversation=conversation, field=FIELD)


@hookimpl
def gateway_declare_fields() -> list[str]:
    return [FIELD]


@hookimpl
def gateway_resolve_conversation(
    request: ConversionRequest, account: AccountConfig, store: Store
) -> Awaitable[Resolved] | None:
    if request.conversation_id is None:
        return None
    return _lookup(store, account, request.conversation_id)
