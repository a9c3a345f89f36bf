"""Resolver: the most recent conversation with a captured click id for ``phoneE164``.

The number is matched in every form WhatsApp stores for the same person (Mexico's ``521``,
Argentina's ``549``, Brazil's ninth digit: :mod:`gateway.phones`), and as a number the person
had before a change; a recycled number's previous owner never matches. If two different stored
numbers match, the most recent conversation with a click wins and the answer says the match was
ambiguous. If the phone has conversations but none with a click id, the most recent one is
returned so the caller hears the precise reason (422, no captured ``ctwa_clid``).
"""

from __future__ import annotations

from collections.abc import Awaitable

from gateway import (
    AccountConfig,
    ConversionRequest,
    NotFound,
    PhoneForms,
    Resolved,
    Store,
    hookimpl,
    invalid_phone,
    parse_phone,
)

FIELD = "phoneE164"


async def _lookup(store: Store, account: AccountConfig, phone: PhoneForms) -> Resolved:
    forms = dict(phone.forms)
    matches = await store.conversations_for_phones(account.id, list(forms))
    # The number's current holder answers for it; a number someone had before a change only
    # when nobody holds it now, and then only its latest former holder.
    current = [m for m in matches if not m.former]
    if current:
        matches = current
    elif matches:
        latest = max(m.replaced_at or 0.0 for m in matches)
        matches = [m for m in matches if (m.replaced_at or 0.0) == latest]
    if not matches:
        if not phone.valid:
            raise invalid_phone()  # not a stored WhatsApp id, and not a real number either
        raise NotFound(
            f"No conversation with this phone number on account {account.id!r}; the person"
            " must have messaged the business's WhatsApp number first.",
            code="conversation_not_found",
            param=FIELD,
        )
    best = matches[0]
    return Resolved(
        conversation=best.conversation,
        field=FIELD,
        form="former_number" if best.former else forms.get(best.matched, "as_sent"),
        # Two stored numbers answered (say 52... and 521...): two people, or one twice.
        ambiguous=len({m.matched for m in matches}) > 1,
    )


@hookimpl
def gateway_declare_fields() -> list[str]:
    return [FIELD]


@hookimpl
def gateway_resolve_conversation(
    request: ConversionRequest, account: AccountConfig, store: Store
) -> Awaitable[Resolved] | None:
    if request.phone_e164 is None:
        return None
    phone = parse_phone(request.phone_e164)
    if phone is None:
        return None  # not a phone number at all: refused by validation first
    return _lookup(store, account, phone)
