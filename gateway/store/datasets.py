"""The dataset registry: the Meta dataset id created for an account (``POST /v1/whatsapp/dataset``).

Kept apart from the outbox: it is configuration the Meta sink learned at run time, not
delivery state. Plugins reach it through :class:`gateway.Store`.
"""

from __future__ import annotations

import time

from gateway.store.sql import Reader, Tx
from gateway.store.writer import WriteOp

__all__ = ["SaveDataset", "stored_datasets"]


class SaveDataset(WriteOp[None]):
    inline = True

    def __init__(self, account_id: str, dataset_id: str) -> None:
        self.row = (account_id, dataset_id, time.time())

    async def apply(self, tx: Tx) -> None:
        await tx.execute(
            "INSERT INTO datasets (account_id, dataset_id, created_at) VALUES (?,?,?)"
            " ON CONFLICT (account_id) DO UPDATE SET dataset_id = excluded.dataset_id",
            self.row,
        )


async def stored_datasets(reader: Reader) -> dict[str, str]:
    """Return the dataset id stored per account."""
    rows = await reader.fetch("SELECT account_id, dataset_id FROM datasets", ())
    return {row[0]: row[1] for row in rows}
