"""Moving an install: every row of one store into another, empty, one, then the counts checked.

``ctwa-gateway store copy --from sqlite:///var/ctwa-gateway.sqlite3 --to env:CTWA_DATABASE_URL``
moves a single-process install onto PostgreSQL (or back). The tables, their columns and their
keys are SQLite's schema, which PostgreSQL's mirrors column for column; rows keep their keys
(an event's ``pk`` is what its deliveries and attempts point at), and are read a chunk at a
time in key order, so a store of any size copies in bounded memory. The counts tables
(``event_hours``, ``delivery_counts``) are copied as they are: the target's triggers follow
updates and deletions only, so copying rows adds nothing to them twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.errors import ConfigError
from gateway.store.database import Store
from gateway.store.pg_schema import PG_MIGRATIONS
from gateway.store.schema import MIGRATIONS, migrate
from gateway.store.sql import Engine, Tx, marks
from gateway.store.writer import WriteOp

__all__ = ["CopyMismatch", "Table", "copy_store", "tables"]

_CHUNK = 1000


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    # Columns of SQLite type REAL and INTEGER: SQLite keeps what it was given, PostgreSQL
    # (asyncpg) takes only floats for the one and whole numbers for the other.
    reals: frozenset[str]
    integers: frozenset[str]


class CopyMismatch(ConfigError):
    """The target's counts differ from the source's after the copy."""


class CopyFailed(ConfigError):
    """The copy stopped part way: the target holds a partial copy."""


def tables() -> list[Table]:
    """The store's tables, parents before the rows that point at them, as the migrations
    leave them."""
    conn = sqlite3.connect(":memory:")
    try:
        migrate(conn)
        names = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' AND name != 'schema_migrations' ORDER BY rowid"
            )
        ]
        found = []
        for name in names:
            info = conn.execute(f"PRAGMA table_info('{name}')").fetchall()
            columns = tuple(row[1] for row in info)
            key = tuple(row[1] for row in sorted(info, key=lambda r: r[5]) if row[5])
            found.append(
                Table(
                    name=name,
                    columns=columns,
                    # A table without a declared key is read in rowid order on SQLite; every
                    # table of the store has one.
                    key=key or columns,
                    reals=frozenset(row[1] for row in info if row[2].upper() == "REAL"),
                    integers=frozenset(row[1] for row in info if row[2].upper() == "INTEGER"),
                )
            )
        return found
    finally:
        conn.close()


class _InsertRows(WriteOp[None]):
    def __init__(self, table: Table, rows: Sequence[Sequence[Any]]) -> None:
        self.table = table
        self.rows = rows

    async def apply(self, tx: Tx) -> None:
        t = self.table
        await tx.executemany(
            f"INSERT INTO {t.name} ({', '.join(t.columns)}) VALUES ({marks(len(t.columns))})",
            self.rows,
        )


class _SyncIdentities(WriteOp[None]):
    """Move PostgreSQL's identity sequences past the copied keys (new rows must not collide
    with copied ones)."""

    def __init__(self, table: Table) -> None:
        self.table = table

    async def apply(self, tx: Tx) -> None:
        if tx.engine != "postgresql" or self.table.key != ("pk",):
            return
        name = self.table.name
        await tx.fetch(
            f"SELECT setval(pg_get_serial_sequence('{name}', 'pk'),"
            f" COALESCE((SELECT MAX(pk) FROM {name}), 0) + 1, false)"
        )


def _coercer(table: Table, target: Engine) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    reals = [i for i, c in enumerate(table.columns) if c in table.reals]
    integers = [i for i, c in enumerate(table.columns) if c in table.integers]
    # SQLite's text may hold a NUL (a display text an older version kept); PostgreSQL's
    # cannot: it goes, and the rest of the text with it stays.
    strip_nul = target == "postgresql"

    def coerce(row: Sequence[Any]) -> tuple[Any, ...]:
        values = list(row)
        if strip_nul:
            values = [v.replace("\x00", "") if isinstance(v, str) else v for v in values]
        for i in reals:
            if isinstance(values[i], int):
                values[i] = float(values[i])
        for i in integers:
            value = values[i]
            if (isinstance(value, float) and value.is_integer()) or isinstance(value, bool):
                values[i] = int(value)
        return tuple(values)

    return coerce


async def count_rows(store: Store, table: Table) -> int:
    rows = await store.query(f"SELECT COUNT(*) FROM {table.name}")
    return int(rows[0][0])


async def copy_store(
    source: Store, target: Store, *, progress: Callable[[str, int], None] | None = None
) -> dict[str, int]:
    """Copy every row of ``source`` into ``target``, which must be empty; return the rows
    per table, checked to be equal on both sides."""
    for side, store in (("source", source), ("target", target)):
        # An older version would copy only the columns it knows, and drop the newer ones'
        # values without a word (PostgreSQL lets an older replica run on a newer schema).
        version = int(
            (await store.query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))[0][0]
        )
        known = len(PG_MIGRATIONS if store.engine == "postgresql" else MIGRATIONS)
        if version > known:
            raise ConfigError(
                f"the {side} store has schema version {version}, newer than this version of"
                f" ctwa-gateway knows ({known}): copy with the version that upgraded it;"
                " nothing was written"
            )
    everything = tables()
    for table in everything:
        if await count_rows(target, table):
            raise ConfigError(
                f"the target store is not empty ({table.name} has rows): copy into a new,"
                " empty database, nothing was written"
            )
    copied: dict[str, int] = {}
    try:
        await _copy_tables(source, target, everything, copied, progress)
    except Exception as exc:
        done = ", ".join(f"{name} {rows}" for name, rows in copied.items() if rows)
        raise CopyFailed(
            # The error's type only: its text may quote a row's values.
            f"the copy failed ({type(exc).__name__}); the target now holds part of the"
            f" store ({done or 'nothing committed'} rows): drop and recreate it, empty, before"
            " copying again"
        ) from exc
    for table in everything:
        there = await count_rows(target, table)
        if there != copied[table.name]:
            raise CopyMismatch(
                f"{table.name}: {copied[table.name]} rows read, {there} in the target"
            )
        here = await count_rows(source, table)
        if here != there:
            raise CopyMismatch(
                f"{table.name}: {here} rows in the source now, {there} copied: was a gateway"
                " writing to it? Stop it, empty the target and copy again"
            )
    return copied


async def _copy_tables(
    source: Store,
    target: Store,
    everything: Sequence[Table],
    copied: dict[str, int],
    progress: Callable[[str, int], None] | None,
) -> None:
    """Copy each table a chunk at a time in key order; ``copied`` counts what committed."""
    for table in everything:
        coerce = _coercer(table, target.engine)
        columns = ", ".join(table.columns)
        key = ", ".join(table.key)
        after: tuple[Any, ...] | None = None
        copied[table.name] = 0
        while True:
            where = "" if after is None else f" WHERE ({key}) > ({marks(len(table.key))})"
            rows = await source.query(
                f"SELECT {columns} FROM {table.name}{where} ORDER BY {key} LIMIT {_CHUNK}",
                after or (),
            )
            if not rows:
                break
            await target.writer.submit(_InsertRows(table, [coerce(row) for row in rows]))
            copied[table.name] += len(rows)
            last = rows[-1]
            after = tuple(last[table.columns.index(k)] for k in table.key)
            if progress is not None:
                progress(table.name, copied[table.name])
        await target.writer.submit(_SyncIdentities(table))
