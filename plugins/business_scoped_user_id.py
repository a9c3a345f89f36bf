"""Resolver: the most recent conversation with a click id for ``businessScopedUserId``.

For users whose phone Meta withholds (META.md §3b). The BSUID matches a conversation's own, its
parent BSUID (linked business portfolios), or one it had before a ``user_changed_user_id``.
"""

from __future__ import annotations

from collections.abc import Awaitable

from gateway import AccountConfig, ConversionRequest, NotFound, Resolved, Store, hookimpl

FIELD = "businessScopedUserId"


async def _lookup(store: Store, account: AccountConfig, bsuid: str) -> Resolved:
    conversation = await store.latest_conversation_for_bsuid(account.id, bsuid)
    if conversation is None:
        raise NotFound(
            f"No conversation with this business-scoped user id on account {account.id!r};"
            " the person must have messaged the business's WhatsApp number first.",
            code="conversation_not_found",
            param=FIELD,
        )
    if conversation.bsuid == bsuid:
        form = "as_sent"
    elif conversation.parent_bsuid == bsuid:
        form = "parent"
    else:
        form = "former_bsuid"
    return Resolved(conversation=conversation, field=FIELD, form=form)


@hookimpl
def gateway_declare_fields() -> list[str]:
    return [FIELD]


@hookimpl
def gateway_resolve_conversation(
    request: ConversionRequest, account: AccountConfig, store: Store
) -> Awaitable[Resolved] | None:
    if request.business_scoped_user_id is None:
        return None
    return _lookup(store, account, request.business_scoped_user_id)
