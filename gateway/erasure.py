"""Erasing one person on request, and suppressing them afterwards (GDPR, LGPD, CCPA).

:func:`erase` is what ``DELETE /v1/whatsapp/users`` and ``ctwa-gateway erase`` run: it finds
the person by phone, BSUID or conversation id, erases them in one transaction
(:mod:`gateway.store.erasure`), checkpoints the database so the bytes leave the file, and,
when asked, records a suppression: a keyed digest (HMAC-SHA256 with the secret
``[privacy] suppression_key_env`` names) of each identifier, so that later captures and
conversions for that person are refused, and the stored value cannot be matched against a
list of phone numbers by anyone without the secret.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config import AccountConfig, Settings
from gateway.errors import ConfigError, InvalidRequest, Unprocessable
from gateway.phones import invalid_phone, parse_phone
from gateway.store.database import Store
from gateway.wire import ErasureCounts

__all__ = ["ErasureTarget", "erase", "suppression_key"]


def suppression_key(settings: Settings, environ: Mapping[str, str]) -> bytes | None:
    """Return the suppression secret, or None if suppression is not configured."""
    name = settings.privacy.suppression_key_env
    if name is None:
        return None
    value = environ.get(name, "")
    if len(value) < 16:
        raise ConfigError(
            f"{settings.source}: environment variable {name} (named at"
            " `$.privacy.suppression_key_env`) must hold at least 16 characters"
        )
    return value.encode()


class ErasureTarget:
    """Who to erase: exactly one of a phone, a BSUID or a conversation id, on one account."""

    def __init__(
        self,
        account_id: str,
        *,
        phone: str | None = None,
        bsuid: str | None = None,
        conversation_id: str | None = None,
    ) -> None:
        given = [n for n, v in (("phoneE164", phone), ("businessScopedUserId", bsuid),
                                ("conversationId", conversation_id)) if v is not None]  # fmt: skip
        if len(given) != 1:
            raise InvalidRequest(
                "Name exactly one person: send one of `phoneE164`, `businessScopedUserId` or"
                f" `conversationId` (got {', '.join(f'`{g}`' for g in given) or 'none'}).",
                code="invalid_erasure",
                param=given[1] if len(given) > 1 else "phoneE164",
            )
        self.account_id = account_id
        self.phones: list[str] = []
        self.bsuids = [bsuid] if bsuid else []
        self.conversation_ids = [conversation_id] if conversation_id else []
        if phone is not None:
            parsed = parse_phone(phone)
            if parsed is None:
                raise invalid_phone()
            self.phones = [digits for digits, _ in parsed.forms]
        self.kind = "phone" if phone else "bsuid" if bsuid else "conversation"


async def erase(
    store: Store, account: AccountConfig, target: ErasureTarget, *, actor: str, suppress: bool
) -> tuple[int, ErasureCounts, bool]:
    """Erase the person; return the audit row's id, what was erased, and whether the bytes
    have already left the database file."""
    if suppress and store.suppression_key is None:
        raise Unprocessable(
            "Suppression needs a secret: set [privacy] suppression_key_env to the name of an"
            " environment variable holding one, or erase without `suppress`.",
            code="suppression_not_configured",
            param="suppress",
        )
    return await store.erase(
        account_id=account.id,
        waba_id=account.waba_id,
        phone_number_id=account.phone_number_id,
        kind=target.kind,
        phones=target.phones,
        bsuids=target.bsuids,
        conversation_ids=target.conversation_ids,
        actor=actor,
        suppress=suppress,
    )
