"""Resolver: find the conversation of a CRM customer by ``externalId``, through a CSV export.

The CRM exports ``external_id,phone`` rows (a header line first). A conversion that carries an
``externalId`` found there is resolved by that customer's phone, in every form WhatsApp stores
it; one without ``externalId`` is left to the next resolver. The file is read at startup (and
checked by ``ctwa-gateway check-config``); a relative ``path`` is taken from the folder of the
gateway's config file.

    [plugins]
    resolvers = ["conversation_id", "crm_csv", "phone"]

    [plugins.crm_csv]
    path = "crm-export.csv"
"""

from __future__ import annotations

import csv
from collections.abc import Awaitable
from pathlib import Path

import msgspec

from gateway import (
    AccountConfig,
    ConfigError,
    ConversionRequest,
    NotFound,
    Resolved,
    Store,
    hookimpl,
    parse_phone,
)

FIELD = "externalId"


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    path: str


class CrmCsv:
    """The plugin object: the export's external id -> phone digits, loaded once."""

    def __init__(self, config: Config, base_dir: Path) -> None:
        self.path = base_dir / config.path
        # Each customer's phone in every form WhatsApp may have stored it.
        self.phones: dict[str, list[str]] = {}

    def load(self) -> None:
        try:
            with self.path.open(newline="", encoding="utf-8") as file:
                rows = list(csv.DictReader(file))
        except OSError as exc:
            raise ConfigError(
                f"crm_csv: cannot read {self.path} ({exc.strerror}); set [plugins.crm_csv] path"
                " (relative paths are taken from the config file's folder)"
            ) from None
        phones = {}
        for line, row in enumerate(rows, start=2):
            parsed = parse_phone(row.get("phone") or "")
            if not row.get("external_id") or parsed is None:
                raise ConfigError(f"crm_csv: {self.path}:{line}: needs an external_id and a phone")
            phones[row["external_id"]] = [digits for digits, _ in parsed.forms]
        self.phones = phones

    @hookimpl
    def gateway_check_config(self) -> None:
        self.load()

    @hookimpl
    def gateway_declare_fields(self) -> list[str]:
        return [FIELD]

    @hookimpl
    def gateway_resolve_conversation(
        self, request: ConversionRequest, account: AccountConfig, store: Store
    ) -> Awaitable[Resolved] | None:
        if request.external_id is None:
            return None
        return self._lookup(request.external_id, account, store)

    async def _lookup(self, external_id: str, account: AccountConfig, store: Store) -> Resolved:
        phones = self.phones.get(external_id)
        if phones is None:
            raise NotFound(
                "No customer with this externalId in the CRM export; send conversationId or"
                " phoneE164 instead, or refresh the export.",
                code="conversation_not_found",
                param=FIELD,
            )
        matches = await store.conversations_for_phones(account.id, phones)
        current = [m for m in matches if not m.former] or matches
        if not current:
            raise NotFound(
                "The CRM customer with this externalId has not messaged the business's"
                " WhatsApp number (no conversation for their phone).",
                code="conversation_not_found",
                param=FIELD,
            )
        return Resolved(conversation=current[0].conversation, field=FIELD, form="crm_export")


def make_plugin(config: Config, base_dir: Path) -> CrmCsv:
    return CrmCsv(config, base_dir)
