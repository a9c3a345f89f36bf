"""The store on PostgreSQL, through asyncpg: any number of gateway replicas on one database.

The queries and writes are :class:`~gateway.store.database.Store`'s, the same as on SQLite;
what differs is underneath:

- **Group commit carries over.** :class:`PgWriter` takes every write queued while the last
  transaction committed into the next one, on one pooled connection: one transaction (and one
  WAL flush) for many requests, never one per request.
- **Constraints settle races between replicas.** Two replicas handling Meta's retry of one
  notification, or the same ``eventId``, at the same moment: the second writer's insert
  waits on the first's unique key, then conflicts. A batch that fails is split, and an op
  that failed on a unique violation, a serialization failure or a deadlock is run again in a
  transaction of its own, where it now sees the first replica's rows (a message seen before,
  an event stored before) and does what it does for a repeat. An op that writes back rows it
  read first checks they are still as read, and runs again the same way when they are not
  (:class:`~gateway.store.writer.LostRace`; capture's conversations).
- **Claims skip what another replica holds** (``FOR UPDATE SKIP LOCKED``,
  :mod:`gateway.store.outbox`), and a committed event wakes every replica's dispatchers
  through ``NOTIFY`` (:data:`OUTBOX_CHANNEL`) instead of waiting for their next poll.
- **Nothing is cached across requests** (:class:`~gateway.store.lookups.LookupCache` is off):
  a click captured by one replica must resolve on another at once.
- **A lost connection** fails the writes and reads in flight (503, nothing acknowledged) and
  the pool connects again for the next ones: no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import structlog

from gateway.errors import ConfigError
from gateway.store.database import Store
from gateway.store.failures import BROKEN, StoreUnavailable
from gateway.store.lookups import LookupCache, Touched
from gateway.store.pg_schema import migrate_pg
from gateway.store.sql import NULL, OUTBOX_CHANNEL, Engine
from gateway.store.writer import GroupCommitWriter, LostRace, QueuedWrite, WriteOp, apply_all

__all__ = [
    "BROKEN",
    "PgReader",
    "PgTx",
    "PgWriter",
    "PostgresStore",
    "StoreUnavailable",
    "connection",
    "redacted_url",
]

log = structlog.get_logger()

# A write that lost a race to another replica is run again alone this many times.
_RETRIES = 3
_RETRYABLE = (
    LostRace,
    asyncpg.UniqueViolationError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)


@functools.lru_cache(maxsize=4096)
def numbered(sql: str) -> str:
    """Return ``sql`` with its ``?`` placeholders as PostgreSQL's ``$1, $2, ...`` (none sits
    inside a quoted literal in the gateway's statements; quotes are skipped all the same)."""
    out: list[str] = []
    n = 0
    quoted = False
    for char in sql:
        if char == "'":
            quoted = not quoted
        if char == "?" and not quoted:
            n += 1
            out.append(f"${n}")
        else:
            out.append(char)
    return "".join(out)


def _rowcount(status: str) -> int:
    """The rows a command changed, from its status ("UPDATE 3", "INSERT 0 1", "DELETE 0")."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PgTx:
    """A :class:`~gateway.store.sql.Tx` on a connection inside an open transaction."""

    engine: Engine = "postgresql"

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return _rowcount(await self.conn.execute(numbered(sql), *_params(params)))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        bound = [_params(row) for row in rows]
        if bound:
            await self.conn.executemany(numbered(sql), bound)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return [tuple(row) for row in await self.conn.fetch(numbered(sql), *_params(params))]


def _params(params: Sequence[Any]) -> list[Any]:
    """``params`` with the rows' NULL (:data:`gateway.store.sql.NULL`, SQLite's) as None."""
    return [None if v is NULL else v for v in params]


class PgReader:
    """A :class:`~gateway.store.sql.Reader` on the pool: each query on a free connection."""

    engine: Engine = "postgresql"

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with connection(self.pool) as conn:
            return [tuple(row) for row in await conn.fetch(numbered(sql), *params)]


class PgWriter(GroupCommitWriter):
    """Commits each group of writes in one transaction on one pooled connection."""

    def __init__(
        self,
        pool: Any,
        *,
        max_batch: int = 1000,
        on_touched: Callable[[Touched], None] | None = None,
        on_commit: Callable[[float, int], None] | None = None,
    ) -> None:
        super().__init__(max_batch=max_batch, on_touched=on_touched, on_commit=on_commit)
        self._pool = pool

    async def _commit(self, batch: list[QueuedWrite]) -> list[tuple[Any, BaseException | None]]:
        ops = [op for op, _ in batch]
        in_flight: list[WriteOp[Any]] = []
        try:
            results = await self._transaction(ops, in_flight)
        except (StoreUnavailable, *BROKEN) as exc:
            # Either the database failed (stopped answering, gone) or one op was slow (a lock
            # wait, a big erasure). Trying each op alone would wait for a dead database again
            # once per op, so only a database that still answers gets its ops tried alone,
            # but not those the batch was applying when it failed (they would wait again).
            if len(ops) == 1 or not await self._answers():
                return [(None, exc) for _ in ops]
            hung = {id(op) for op in in_flight}
            others = [op for op in ops if id(op) not in hung]
            alone = iter(await self._each_alone(others, give_up_on_timeout=True))
            return [(None, exc) if id(op) in hung else next(alone) for op in ops]
        except Exception:
            # One op's failure (or a lost race) must not fail its neighbours: each alone.
            return await self._each_alone(ops)
        return self._committed(results)

    async def _each_alone(
        self, ops: Sequence[WriteOp[Any]], *, give_up_on_timeout: bool = False
    ) -> list[tuple[Any, BaseException | None]]:
        """Each op in a transaction of its own. After a batch that timed out, the first op
        that times out alone too fails the rest at once: they may all wait on one lock, and
        a timeout each would hold every write of this process that long."""
        settled: list[tuple[Any, BaseException | None]] = []
        for op in ops:
            try:
                (result,) = await self._alone(op)
            except StoreUnavailable as exc:
                if give_up_on_timeout:
                    return settled + [(None, exc)] * (len(ops) - len(settled))
                settled.append((None, exc))
            except Exception as exc:
                settled.append((None, exc))
            else:
                settled.append((result, None))
        return settled

    async def _answers(self) -> bool:
        """Whether the database answers a trivial query within a moment."""
        try:
            async with asyncio.timeout(_PING_S), connection(self._pool) as conn:
                await conn.fetchval("SELECT 1")
        except Exception:
            return False
        return True

    async def _alone(self, op: WriteOp[Any]) -> list[Any]:
        for attempt in range(_RETRIES + 1):
            try:
                return await self._transaction([op])
            except _RETRYABLE:
                if attempt == _RETRIES:
                    raise
                # Another replica's transaction is committing what this one collided with.
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _transaction(
        self, ops: Sequence[WriteOp[Any]], in_flight: list[WriteOp[Any]] | None = None
    ) -> list[Any]:
        async with connection(self._pool) as conn, conn.transaction():
            return await apply_all(PgTx(conn), ops, in_flight)


@contextlib.asynccontextmanager
async def connection(pool: Any) -> AsyncIterator[Any]:
    """A pooled connection. One that cannot be had is :class:`StoreUnavailable` (the OS's
    own error says only "connection refused" or "no such file": a socket's path); one that
    fails as a connection, not a query, is terminated, so the pool opens a fresh one for the
    next caller instead of handing this one out again."""
    try:
        conn = await pool.acquire()
    except OSError as exc:
        raise StoreUnavailable(f"PostgreSQL cannot be reached: {type(exc).__name__}") from exc
    try:
        yield conn
    except BROKEN:
        conn.terminate()
        raise
    except TimeoutError as exc:
        # A statement past ``[store] command_timeout_s``: a database that stopped answering
        # (frozen, cut off, locked up). The caller hears the store is unavailable (a 503:
        # nothing was acknowledged), not an internal error, and the connection, perhaps
        # still inside that statement, is not handed out again.
        conn.terminate()
        raise StoreUnavailable("PostgreSQL did not answer in time") from exc
    except asyncio.CancelledError:
        # Cut off mid-statement (a deadline, a request gone away): released as it is, the
        # pool would first wait, up to command_timeout_s, for a server that may not answer
        # to confirm the statement's cancellation.
        conn.terminate()
        raise
    finally:
        await pool.release(conn)


def redacted_url(url: str) -> str:
    """``url`` without its password (in the authority or as a ``password=`` parameter), for
    messages and logs; one that does not parse is not shown at all."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "(a URL that does not parse)"
    netloc = parts.netloc if password is None else parts.netloc.replace(f":{password}@", ":***@")
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return parts._replace(netloc=netloc, query=query).geturl()


class PostgresStore(Store):
    """The store in a PostgreSQL database, shared by every replica that opens it."""

    def __init__(self, pool: Any, url: str, *, max_batch: int) -> None:
        reader = PgReader(pool)
        lookups = LookupCache(None, enabled=False)
        super().__init__(
            writer=PgWriter(pool, max_batch=max_batch, on_touched=lookups.touched),
            quick=reader,
            scan=reader,
            lookups=lookups,
        )
        self.pool = pool
        self._url = url
        self._listening: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        max_batch: int = 1000,
        min_connections: int = 2,
        max_connections: int = 10,
        command_timeout_s: float = 30.0,
    ) -> PostgresStore:
        """Connect, apply the migrations this database has not seen (once, however many
        replicas start together) and start the writer. A statement that takes longer than
        ``command_timeout_s`` makes the store unavailable for its caller (migrations, which
        may index millions of rows, have no limit)."""
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_connections,
                max_size=max_connections,
                command_timeout=command_timeout_s,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            raise ConfigError(
                f"cannot connect to the PostgreSQL store {redacted_url(url)}:"
                f" {type(exc).__name__}: {_without(str(exc), url)}"
            ) from None
        try:
            conn = await asyncpg.connect(url)
            try:
                await migrate_pg(conn)
            finally:
                await conn.close()
        except BaseException:
            await pool.close()
            raise
        store = cls(pool, url, max_batch=max_batch)
        store.writer.start()
        await store.load_suppressions()
        return store

    async def listen(self, on_work: Callable[[], None]) -> None:
        """Call ``on_work`` whenever any replica commits work for the dispatchers; keep
        listening across lost connections."""
        self._listening = asyncio.create_task(self._listen(on_work), name="ctwa-pg-listen")

    async def _listen(self, on_work: Callable[[], None]) -> None:
        # A connection of its own, not the pool's: it stays in LISTEN for the process's life,
        # and a shutdown must never wait for it to be given back.
        while True:
            try:
                conn = await asyncpg.connect(self._url)
            except Exception:
                log.warning("store_listen_failed", retry_s=1.0)
                await asyncio.sleep(1.0)
                continue
            try:
                await self._listen_on(conn, on_work)
                log.warning("store_listen_lost", retry_s=1.0)
            except Exception:
                log.warning("store_listen_failed", retry_s=1.0)
            finally:
                conn.terminate()
            await asyncio.sleep(1.0)

    async def _listen_on(self, conn: Any, on_work: Callable[[], None]) -> None:
        """Listen on ``conn`` until it is lost."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        await conn.add_listener(OUTBOX_CHANNEL, lambda *_: on_work())
        # Work committed while nobody listened would otherwise wait for a poll.
        on_work()
        await lost.wait()

    async def size_bytes(self) -> int:
        rows = await self._reader.fetch("SELECT pg_database_size(current_database())")
        return int(rows[0][0])

    # VACUUM frees dead row versions but does not zero their bytes, and a snapshot another
    # session holds keeps them: PostgreSQL gives no way to say the files are clear.
    checkpoint_clears = False

    async def checkpoint(self, *, busy_timeout_ms: int = 5000) -> bool:
        """VACUUM the tables an erasure rewrites, so their dead row versions (the erased
        values) are pruned now rather than at autovacuum's next pass; return False, as the
        files are not known to be clear of them (see the README)."""
        async with connection(self.pool) as conn:
            for table in _ERASED_TABLES:
                # Within the statement limit: one cut short (a lock in its way, a huge table)
                # is left to autovacuum, and the erasure is answered all the same.
                await conn.execute(f"VACUUM {table}")
        return False

    async def _closed(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
        try:
            # Gracefully, unless a connection is stuck (a query the server never answers).
            await asyncio.wait_for(self.pool.close(), _CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("store_close_timed_out", timeout_s=_CLOSE_TIMEOUT_S)
            self.pool.terminate()


_CLOSE_TIMEOUT_S = 10.0
# How long the database may take to answer SELECT 1 before a timeout counts as its failure.
_PING_S = 2.0
_ERASED_TABLES = (
    "conversations",
    "conversation_aliases",
    "webhook_messages",
    "automatic_events",
    "events",
    "deliveries",
    "webhook_notifications",
)


def _without(message: str, url: str) -> str:
    """An error message with the URL's passwords taken out, should the driver quote them."""
    try:
        secrets = [urlsplit(url).password or ""]
    except ValueError:
        return "(the URL does not parse)"
    secrets += re.findall(r"(?i)password=([^&]+)", url)
    for secret in filter(None, secrets):
        message = message.replace(secret, "***")
    return message
