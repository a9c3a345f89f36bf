"""pytest fixtures for tests that need PostgreSQL: one server per session, a database per test.

Load with ``pytest_plugins = ["tests.pg_fixtures"]`` (the root conftest, or a test module).
A test that asks for ``pg_url`` fails, never skips, when PostgreSQL cannot be had: a store
backend whose tests quietly stop running is a backend nobody tests.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tests.postgres import (
    SERVER_URL_VARIABLE,
    PostgresCluster,
    PostgresUnavailable,
    create_database,
    database_url,
    drop_database,
)

__all__ = ["pg_server", "pg_url"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """Yield the URL of the session's PostgreSQL server (started here unless given)."""
    given = os.environ.get(SERVER_URL_VARIABLE)
    if given:
        yield given
        return
    try:
        cluster = PostgresCluster.start()
    except PostgresUnavailable as error:
        problem = str(error)
    else:
        problem = ""
    if problem:
        # Outside the except block, so the report is the reason alone, not two tracebacks.
        pytest.fail(f"cannot start PostgreSQL for the tests: {problem}", pytrace=False)
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
async def pg_url(pg_server: str) -> AsyncIterator[str]:
    """Yield the URL of a new, empty database, dropped after the test."""
    try:
        name = await create_database(pg_server)
    except (OSError, asyncpg.PostgresError) as error:
        problem = f"{type(error).__name__}: {error}"
    else:
        problem = ""
    if problem:
        # The URL may carry a password: say where it came from instead.
        source = SERVER_URL_VARIABLE if os.environ.get(SERVER_URL_VARIABLE) else "the test cluster"
        pytest.fail(f"cannot create a database on {source}: {problem}", pytrace=False)
    try:
        yield database_url(pg_server, name)
    finally:
        await drop_database(pg_server, name)
