"""SQL the same way on both engines: what a write runs inside its transaction, and what a read
runs outside one.

Every write the store makes is a :class:`~gateway.store.writer.WriteOp` whose ``apply`` takes a
:class:`Tx`; every query outside a write goes through a :class:`Reader`. Statements are written
once, with ``?`` placeholders and SQL both engines take (``ON CONFLICT (...) DO ...``,
``IS DISTINCT FROM``, ``RETURNING``); where they differ, the code asks ``engine``.

The methods are coroutines on both engines. On PostgreSQL they wait on the network. On SQLite
they never suspend (the statement runs right away, on whatever thread drives the op), so the
writer runs a SQLite op to the end with :func:`run_sync`, without an event loop: the same op
runs on the loop's thread or the writer's, as :mod:`gateway.store.writer` decides.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, Literal, Protocol, TypeVar

import aiosqlite

__all__ = [
    "NULL",
    "OUTBOX_CHANNEL",
    "Engine",
    "Reader",
    "SqliteReader",
    "SqliteTx",
    "Tx",
    "bindable",
    "marks",
    "run_sync",
    "wake_dispatchers",
]

T = TypeVar("T")
Engine = Literal["sqlite", "postgresql"]
# PostgreSQL's channel for committed work for the dispatchers (new events, replays): every
# replica listens on it.
OUTBOX_CHANNEL = "ctwa_gateway_outbox"


class Tx(Protocol):
    """Statements inside the open write transaction."""

    engine: Engine

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; return how many rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement for each parameter row."""
        ...

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one statement and return its rows (tuples, read by position)."""
        ...


class Reader(Protocol):
    """Queries outside a write transaction."""

    engine: Engine

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one query and return its rows (tuples, read by position)."""
        ...


# The types the sqlite3 module binds as they are. Any other value (None, bytes, a bool) goes
# through its adaptation protocol first, which looks up __adapt__ and __conform__ and formats
# an AttributeError for each miss: about 3,300 instructions a parameter, a dozen parameters a
# conversion (4.5% of a request's instructions, by callgrind).
_BOUND_AS_IS = frozenset({str, int, float, bytearray})
# SQLite binds a NaN as NULL (it stores no NaN: sqlite3_bind_double makes it NULL), so a NaN
# is a NULL the module binds without adapting None (tests/test_store_edges.py holds SQLite
# to it). The rows of a conversion's write (gateway.store.rows) carry this very object for
# NULL, already as SQLite binds it; PostgreSQL's Tx passes None in its place (the object,
# not any NaN: a float column's NaN would stay one).
NULL = float("nan")


def bindable(params: Sequence[Any]) -> list[Any]:
    """``params`` as the sqlite3 module binds fastest, each to the same SQL value: None as
    NaN (NULL), bytes as a bytearray (the same BLOB), a bool as its int."""
    return [
        v
        if type(v) in _BOUND_AS_IS
        else NULL
        if v is None
        else bytearray(v)
        if type(v) is bytes
        else int(v)
        if type(v) is bool
        else v
        for v in params
    ]


class SqliteTx:
    """A :class:`Tx` over the writer's ``sqlite3`` connection."""

    engine: Engine = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, bindable(params)).rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, (bindable(row) for row in rows))

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self.conn.execute(sql, bindable(params)).fetchall()


class SqliteReader:
    """A :class:`Reader` over an aiosqlite connection: the query runs on its thread, and every
    row comes back in one trip (``execute_fetchall``; a cursor's execute, fetch and close
    would be three)."""

    engine: Engine = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self.conn.execute_fetchall(sql, params))


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (a write op on a :class:`SqliteTx`) to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a write op on SQLite awaited something other than its transaction")


def marks(count: int) -> str:
    """``count`` placeholders, comma-separated: an ``IN (...)`` list's."""
    return ",".join("?" * count)


async def wake_dispatchers(tx: Tx) -> None:
    """Have every replica's dispatchers look for work once this transaction commits (a
    PostgreSQL ``NOTIFY``, delivered at commit and only then; repeats in one transaction are
    folded into one). On SQLite the one process that wrote wakes its own."""
    if tx.engine == "postgresql":
        await tx.execute("SELECT pg_notify(?, '')", (OUTBOX_CHANNEL,))
