"""What a store failure means: the store cannot be used now (full, read-only, locked, gone),
or something else (a bug, a value it refuses), and the words an operator reads for it.

The writer uses :func:`unavailable_reason` to know when writes fail for want of room or
access (``/readyz`` then answers not ready, :mod:`gateway.store.readiness`); the CLI to tell
an operator to try again later rather than report a bug.
"""

from __future__ import annotations

import sqlite3

import asyncpg

__all__ = ["BROKEN", "StoreBug", "StoreUnavailable", "unavailable_reason", "withheld"]


class StoreUnavailable(Exception):
    """PostgreSQL cannot be reached (refused, no socket, not answering): nothing was done."""


class StoreBug(Exception):
    """A database error that is not the store being unavailable, as a command shows it: its
    kind and code, without what the database quoted (:func:`withheld`)."""


# What a connection whose server went away raises; asyncpg may not have noticed yet, and
# reports it as a client state error (InternalClientError) on the next query.
BROKEN = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.InternalClientError)

_FULL = "the disk is full (the database cannot grow)"
_READ_ONLY = "the database is read-only (its file, folder or server takes no writes)"
_LOCKED = "the database is locked (another process holds it past the timeout)"
_IO = "the disk reports an I/O error"
_DAMAGED = "the database file is damaged"

# SQLite's primary result codes (the low byte of the extended code).
_SQLITE = {
    3: "the database file cannot be accessed (permissions)",  # SQLITE_PERM
    5: _LOCKED,  # SQLITE_BUSY
    6: _LOCKED,  # SQLITE_LOCKED
    7: "the system is out of memory",  # SQLITE_NOMEM
    8: _READ_ONLY,  # SQLITE_READONLY
    10: _IO,  # SQLITE_IOERR
    11: _DAMAGED,  # SQLITE_CORRUPT
    13: _FULL,  # SQLITE_FULL
    14: "the database file cannot be opened",  # SQLITE_CANTOPEN
    15: _LOCKED,  # SQLITE_PROTOCOL (a lock race)
    26: _DAMAGED,  # SQLITE_NOTADB
}

# PostgreSQL's, most specific first (a subclass before its class).
_POSTGRES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (asyncpg.DiskFullError, _FULL),
    (asyncpg.OutOfMemoryError, "the database server is out of memory"),
    (asyncpg.TooManyConnectionsError, "the database server takes no more connections"),
    (asyncpg.InsufficientResourcesError, "the database server is out of resources"),
    (asyncpg.ReadOnlySQLTransactionError, _READ_ONLY),
    (asyncpg.LockNotAvailableError, _LOCKED),
    (asyncpg.DeadlockDetectedError, _LOCKED),
    (asyncpg.QueryCanceledError, "the database cancelled the statement (a timeout)"),
    (asyncpg.OperatorInterventionError, "the database server is shutting down or starting"),
    (asyncpg.PostgresSystemError, _IO),
    (asyncpg.DataCorruptedError, _DAMAGED),
    (asyncpg.IndexCorruptedError, _DAMAGED),
    (StoreUnavailable, "the database cannot be reached or does not answer"),
    (BROKEN, "the connection to the database was lost"),
)


def unavailable_reason(exc: BaseException) -> str | None:
    """Why the store cannot be used now, if ``exc`` says so (in words for an operator, with
    nothing of the database's own message: no path, no value), else None: a failure of the
    caller's statement or input (a constraint, a syntax error) is not the store's."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:
            # Raised by the sqlite3 module itself, not by SQLite: a closed connection is one.
            closed = isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc)
            return "the database is closed" if closed else None
        return _SQLITE.get(code & 0xFF)
    for kind, reason in _POSTGRES:
        if isinstance(exc, kind):
            return reason
    if type(exc) is ValueError and "Connection closed" in str(exc):
        # aiosqlite's, for a store that is shutting down.
        return "the database is closed"
    return None


def withheld(exc: Exception) -> Exception:
    """Return ``exc`` as a command may print it. PostgreSQL's message and detail quote the row
    it refused ("Key (account_id, wa_id)=(acme, 16505551234) already exists"), which may be a
    person's phone or BSUID: only the error's kind and SQLSTATE are kept. SQLite's messages
    name tables and columns, never values: its errors are returned as they are."""
    if isinstance(exc, asyncpg.PostgresError):
        return StoreBug(
            f"PostgreSQL refused the work: {type(exc).__name__} (SQLSTATE {exc.sqlstate});"
            " its message is withheld, as it may quote personal data"
        )
    return exc
