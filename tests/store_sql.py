"""What a test does to the app's store behind the gateway's back, on either engine: rows as an
older version wrote them, times made to look old, a fault injected into a table, and every
byte the store holds (to check an erasure left nothing).

Writes go through the store's own writer (one transaction, committed like any other write),
so they need no second connection to the database and drop the conversation lookups' cache.
Reads are tests.conftest's ``db_rows``, or :func:`store_rows` while no app is running.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import parse_settings
from gateway.store.database import SqliteStore
from gateway.store.engines import open_store
from gateway.store.lookups import EVERYTHING, Touched
from gateway.store.sql import Tx
from gateway.store.writer import WriteOp
from tests.conftest import ENV, db_rows, store_of

__all__ = [
    "add_fault",
    "db_execute",
    "drop_fault",
    "store_rows",
    "stored_bytes",
    "table_columns",
]

Client = TestClient[web.Request, web.Application]


class _Statements(WriteOp[list[int]]):
    """Statements (SQL and parameters) a test runs in one write transaction."""

    def __init__(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        self.statements = statements

    async def apply(self, tx: Tx) -> list[int]:
        return [await tx.execute(sql, params) for sql, params in self.statements]

    def touched(self) -> Touched | None:
        return EVERYTHING  # whatever the statements changed, no lookup may be served stale


async def _run(client: Client, *statements: tuple[str, Sequence[Any]]) -> list[int]:
    return await store_of(client).writer.submit(_Statements(statements))


async def db_execute(client: Client, sql: str, *params: Any) -> int:
    """Run one statement (``?`` placeholders) in a write transaction of the app's store,
    whichever its engine; return how many rows it changed."""
    (changed,) = await _run(client, (sql, params))
    return changed


async def add_fault(client: Client, name: str, table: str, message: str, when: str = "") -> None:
    """Make every INSERT into ``table`` (of a row for which the condition ``when`` on ``NEW``
    holds, if given) fail with ``message``: a real fault of the store, inside the transaction
    that writes the row."""
    if store_of(client).engine == "sqlite":
        condition = f" WHEN {when}" if when else ""
        await _run(
            client,
            (
                f"CREATE TRIGGER {name} BEFORE INSERT ON {table}{condition}"
                f" BEGIN SELECT RAISE(ABORT, '{message}'); END",
                (),
            ),
        )
        return
    condition = f" WHEN ({when})" if when else ""
    await _run(
        client,
        (
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS"
            f" $fault$ BEGIN RAISE EXCEPTION '{message}'; END $fault$",
            (),
        ),
        (
            f"CREATE TRIGGER {name} BEFORE INSERT ON {table} FOR EACH ROW{condition}"
            f" EXECUTE FUNCTION {name}()",
            (),
        ),
    )


async def drop_fault(client: Client, name: str, table: str) -> None:
    """Remove a fault :func:`add_fault` made."""
    if store_of(client).engine == "sqlite":
        await _run(client, (f"DROP TRIGGER {name}", ()))
    else:
        await _run(client, (f"DROP TRIGGER {name} ON {table}", ()), (f"DROP FUNCTION {name}", ()))


async def table_columns(client: Client) -> dict[str, list[str]]:
    """Return the store's tables and the names of their columns."""
    if store_of(client).engine == "sqlite":
        tables = await db_rows(
            client, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        )
        return {
            table: [
                name
                for (name,) in await db_rows(client, "SELECT name FROM pragma_table_info(?)", table)
            ]
            for (table,) in tables
        }
    rows = await db_rows(
        client,
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position",
    )
    columns: dict[str, list[str]] = {}
    for table, column in rows:
        columns.setdefault(table, []).append(column)
    return columns


def _file_bytes(db: Path) -> bytes:
    return b"".join(
        p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()
    )


async def stored_bytes(client: Client) -> bytes:
    """Return every byte the store holds: on SQLite its files (database, WAL and shared
    memory, free pages included); on PostgreSQL, whose files are the server's, every value
    of every row of every table (bytes as stored, anything else as text)."""
    store = store_of(client)
    if isinstance(store, SqliteStore):
        return _file_bytes(store.path)
    values: list[bytes] = []
    for table, columns in (await table_columns(client)).items():
        for column in columns:
            # Names from the database's own catalogue, not from anyone's input.
            for (value,) in await db_rows(client, f'SELECT "{column}" FROM "{table}"'):  # noqa: S608
                values.append(value if isinstance(value, bytes) else str(value).encode())
    return b"\0".join(values)


async def store_rows(config: dict[str, Any], sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run a query (``?`` placeholders) on the store ``config`` names, opened for it: what a
    test reads while no app is running (after a CLI command in another process)."""
    store = await open_store(parse_settings(config), ENV, create=False)
    try:
        return [tuple(row) for row in await store.query(sql, params)]
    finally:
        await store.close()
