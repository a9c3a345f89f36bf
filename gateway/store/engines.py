"""Which store a configuration or a location names, opened: SQLite or PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

import asyncpg

from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.store.database import SqliteStore, Store
from gateway.store.failures import BROKEN, StoreUnavailable
from gateway.store.postgres import PostgresStore, redacted_url

__all__ = ["describe", "open_location", "open_store", "store_unavailable"]


def store_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is the store failing (full, locked, gone), not the caller's mistake:
    nothing it was writing was kept, and the same work may be tried again."""
    # aiosqlite raises ValueError("Connection closed") for a store that is shutting down;
    # asyncpg raises its own errors for a PostgreSQL that is gone, full or read-only, and the
    # PostgreSQL store StoreUnavailable while it cannot connect again.
    return isinstance(exc, (sqlite3.Error, asyncpg.PostgresError, StoreUnavailable, *BROKEN)) or (
        type(exc) is ValueError and "Connection closed" in str(exc)
    )


async def open_store(
    settings: Settings, environ: Mapping[str, str], *, create: bool = True
) -> Store:
    """Open the store ``[store]`` names: the PostgreSQL database of ``url``/``url_env``, else
    the SQLite file at ``path`` (created unless ``create`` is false)."""
    store = settings.store
    if settings.uses_postgres():
        return await PostgresStore.open(
            settings.store_url(environ),
            max_batch=store.group_commit_max,
            min_connections=store.min_connections,
            max_connections=store.max_connections,
            command_timeout_s=store.command_timeout_s,
        )
    return await SqliteStore.open(
        settings.store_path(), max_batch=store.group_commit_max, create=create
    )


async def open_location(location: str, *, create: bool) -> Store:
    """Open a store by its location: ``sqlite:///path/to/file`` (or a bare path) or a
    ``postgresql://`` URL."""
    if location.startswith(("postgresql://", "postgres://")):
        return await PostgresStore.open(location, min_connections=1, max_connections=4)
    scheme, sep, _ = location.partition("://")
    if sep and scheme != "sqlite":
        raise ConfigError(
            f"{scheme}:// is not a store: name sqlite:///path/to/file, a postgresql:// URL,"
            " or env:NAME"
        )
    path = location.removeprefix("sqlite://") if location.startswith("sqlite://") else location
    if not path:
        raise ConfigError(f"{location!r}: name a file, as sqlite:///var/ctwa-gateway.sqlite3")
    return await SqliteStore.open(Path(path), create=create)


def describe(settings: Settings, environ: Mapping[str, str]) -> str:
    """Where the store is, for a person to read (a URL without its password)."""
    if settings.uses_postgres():
        try:
            return redacted_url(settings.store_url(environ))
        except ConfigError as exc:
            return f"PostgreSQL, but {exc}"
    return str(settings.store_path())
