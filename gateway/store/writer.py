"""The store's writer: every write the gateway makes, committed in groups.

Many requests' writes share one transaction (and so one fsync): while a batch commits, the
next requests queue up, and the next batch takes them all. A caller's future resolves only
after the transaction holding its write has committed, so no response leaves before its row
is on disk (``synchronous = FULL``). :class:`GroupCommitWriter` is that queue;
:class:`SqliteWriter` commits a group on SQLite (below), and
:class:`gateway.store.postgres.PgWriter` on PostgreSQL.

On SQLite, where a batch runs is what makes the hot path cheap. A batch of *inline* ops (a
conversion's insert: a few rows into pages the connection has cached) is written right on the
event loop's thread, and only its COMMIT, the fsync, goes to the writer's thread: one hop per
transaction. Every hop costs the two threads a hand-over of the GIL each way, and a statement
run on another thread pays one per statement. Any other batch (a webhook notification's
capture, retention, an erasure: work that may read many pages) runs whole on the writer's
thread, so the loop never waits on it; so does an inline batch when another process holds the
write lock (the loop never waits for a lock either).

One failing write does not fail its neighbours: the batch is rolled back and each write is
then tried in a transaction of its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import structlog

from gateway.store.failures import unavailable_reason
from gateway.store.lookups import EVERYTHING, Touched
from gateway.store.sql import SqliteTx, Tx, run_sync

__all__ = [
    "GroupCommitWriter",
    "LostRace",
    "QueuedWrite",
    "SqliteWriter",
    "WriteOp",
    "WriteTrouble",
    "apply_all",
]

T = TypeVar("T")
log = structlog.get_logger()

# A queued write and the future its caller waits on.
QueuedWrite = tuple["WriteOp[Any]", "asyncio.Future[Any]"]
# How long the writer's thread waits for another process's write lock.
_BUSY_TIMEOUT_MS = 5000


class LostRace(Exception):
    """Raised inside a transaction by an op that finds rows it read changed (or gone) by
    another process before it could write them back. Only PostgreSQL's replicas race: its
    writer runs the op again in a transaction of its own, whose reads see the other's commit.
    """


class WriteOp(Generic[T]):
    """One unit of writing; subclasses override :meth:`apply` or :meth:`apply_many`.

    Both run inside the open transaction, through a :class:`~gateway.store.sql.Tx`. On SQLite
    that is on the loop's thread for an ``inline`` op and on the writer's thread otherwise, and
    nothing of the event loop is at hand either way: an op awaits only its ``tx``.
    """

    # True for a few rows' worth of writing into hot pages (see the module's docstring).
    inline: ClassVar[bool] = False
    # Whether committing it shows the store takes writes again after they failed: only
    # /readyz's probe, which always adds a row of a few pages. Any other op may commit having
    # written nothing (the ping, a dispatcher's look that found nothing due, a retried
    # event's duplicate), and an empty transaction commits on a full disk.
    proves_writable: ClassVar[bool] = False

    async def apply(self, tx: Tx) -> T:
        """Write inside the open transaction and return this op's result."""
        raise NotImplementedError

    @classmethod
    async def apply_many(cls, tx: Tx, ops: Sequence[WriteOp[Any]]) -> list[Any]:
        """Write several ops of this class at once; override to batch statements."""
        return [await op.apply(tx) for op in ops]

    def touched(self) -> Touched | None:
        """After :meth:`apply`: what this op changed that conversation lookups depend on
        (:mod:`gateway.store.lookups`); None if it changed no conversation."""
        return None


async def apply_all(
    tx: Tx, ops: Sequence[WriteOp[Any]], in_flight: list[WriteOp[Any]] | None = None
) -> list[Any]:
    """Apply ``ops`` in order inside one transaction; return their results. ``in_flight``,
    if given, holds the ops being applied at any moment (those left there by a failure are
    the ones it happened in)."""
    results: list[Any] = []
    i = 0
    # Consecutive ops of one class are applied together, so they can share statements.
    while i < len(ops):
        j = i
        while j < len(ops) and type(ops[j]) is type(ops[i]):
            j += 1
        if in_flight is not None:
            in_flight[:] = ops[i:j]
        results.extend(await type(ops[i]).apply_many(tx, ops[i:j]))
        i = j
    return results


@dataclass(frozen=True)
class WriteTrouble:
    """Writes fail for a reason of the store's (full, read-only, locked), since ``since``."""

    reason: str
    since: float


class GroupCommitWriter:
    """The queue every write goes through, committed in groups; :meth:`submit` is the only
    way to write. Each engine's writer says how a group is committed (:meth:`_commit`)."""

    def __init__(
        self,
        *,
        max_batch: int = 1000,
        on_touched: Callable[[Touched], None] | None = None,
        on_commit: Callable[[float, int], None] | None = None,
    ) -> None:
        self._on_touched = on_touched
        # (seconds from the first statement to COMMIT returning, writes): for the metrics.
        self.on_commit = on_commit
        self._max_batch = max_batch
        self._queue: collections.deque[QueuedWrite] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0
        self.ops = 0
        # Set while writes fail for the store's own reasons (:meth:`_note_outcome`).
        self.trouble: WriteTrouble | None = None

    def start(self) -> None:
        """Start the writer; call once, from the running loop that will submit."""
        self._loop = asyncio.get_running_loop()

    async def submit(self, op: WriteOp[T]) -> T:
        """Queue ``op`` and wait until the transaction holding it has committed."""
        loop = self._loop
        if self._closing or loop is None:
            raise RuntimeError("the store writer is not running")
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.append((op, fut))
        if self._running is None:
            # A task, not a call now: the requests of this turn of the loop join the batch. In
            # a context of its own: it serves every request, not the one that woke it.
            self._running = loop.create_task(
                self._drain(), name="ctwa-gateway-writer", context=contextvars.Context()
            )
        return await fut

    async def close(self) -> None:
        """Let queued writes commit, then stop."""
        if self._loop is None or self._closing:
            return
        self._closing = True
        if self._running is not None:
            await asyncio.shield(self._running)
        self._stopped()

    def _stopped(self) -> None:
        """Release what the engine's writer holds (the queue is empty)."""

    def _committed(self, results: list[Any]) -> list[tuple[Any, BaseException | None]]:
        """Count a batch committed in one transaction; settle each op with its result."""
        self.batches += 1
        self.ops += len(results)
        return [(result, None) for result in results]

    async def _commit(self, batch: list[QueuedWrite]) -> list[tuple[Any, BaseException | None]]:
        """Commit the ops of ``batch`` in one transaction if they all succeed, else each
        that can on its own; return each op's result or exception."""
        raise NotImplementedError

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = [
                    self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))
                ]
                started = time.perf_counter()
                settled = await self._commit(batch)
                if self.on_commit is not None:
                    self.on_commit(time.perf_counter() - started, len(batch))
                # Before any caller hears back: nothing after a write may see the old answers.
                self._forget_touched([op for op, _ in batch])
                self._note_outcome(batch, settled)
                for (_, fut), (result, exc) in zip(batch, settled, strict=True):
                    if fut.done():
                        continue  # the caller gave up (a client gone away)
                    if exc is not None:
                        fut.set_exception(exc)
                    else:
                        fut.set_result(result)
        finally:
            self._running = None

    def _note_outcome(
        self, batch: list[QueuedWrite], settled: list[tuple[Any, BaseException | None]]
    ) -> None:
        """Remember whether writes fail for the store's reasons (``/readyz`` says so): set by
        a write that failed so, cleared by the probe committing after it."""
        failed: str | None = None
        wrote = False
        for (op, _), (_, exc) in zip(batch, settled, strict=True):
            if exc is None:
                wrote = wrote or op.proves_writable
            elif failed is None:
                failed = unavailable_reason(exc)
        if failed is not None:
            since = time.time() if self.trouble is None else self.trouble.since
            self.trouble = WriteTrouble(failed, since)
        elif wrote:
            self.trouble = None

    def _forget_touched(self, ops: list[WriteOp[Any]]) -> None:
        if self._on_touched is None:
            return
        tags: set[tuple[str, ...]] = set()
        for op in ops:
            touched = op.touched()
            if touched is EVERYTHING:
                self._on_touched(EVERYTHING)
                return
            if touched:
                tags |= touched
        if tags:
            self._on_touched(frozenset(tags))


class SqliteWriter(GroupCommitWriter):
    """The writer of one SQLite file, through its single write connection."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        max_batch: int = 1000,
        on_touched: Callable[[Touched], None] | None = None,
        on_commit: Callable[[float, int], None] | None = None,
    ) -> None:
        super().__init__(max_batch=max_batch, on_touched=on_touched, on_commit=on_commit)
        self._conn = conn
        self._tx = SqliteTx(conn)
        self._thread: ThreadPoolExecutor | None = None
        # The connection's busy timeout as last set: 0 on the loop, which must not wait.
        self._busy_timeout_ms = -1

    def start(self) -> None:
        super().start()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ctwa-gateway-writer")

    def _stopped(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)

    async def _commit(self, batch: list[QueuedWrite]) -> list[tuple[Any, BaseException | None]]:
        ops = [op for op, _ in batch]
        results: list[Any] | None = None
        if all(op.inline for op in ops) and self._begin_on_loop():
            try:
                results = self._apply(ops)
            except Exception:
                self._rollback()
            else:
                try:
                    await self._on_thread(self._conn.execute, "COMMIT")
                except Exception:
                    self._rollback()
                    results = None
        if results is None:
            settled: list[tuple[Any, BaseException | None]] = await self._on_thread(
                self._commit_on_thread, ops
            )
            return settled
        return self._committed(results)

    def _begin_on_loop(self) -> bool:
        """BEGIN IMMEDIATE without waiting; False if another process holds the write lock."""
        self._set_busy_timeout(0)
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False
        return True

    def _commit_on_thread(self, ops: list[WriteOp[Any]]) -> list[tuple[Any, BaseException | None]]:
        """The whole transaction on the writer's thread; on failure, each op on its own."""
        self._set_busy_timeout(_BUSY_TIMEOUT_MS)
        try:
            results = self._transaction(ops)
        except Exception:
            settled: list[tuple[Any, BaseException | None]] = []
            for op in ops:
                try:
                    (result,) = self._transaction([op])
                except Exception as exc:
                    settled.append((None, exc))
                else:
                    settled.append((result, None))
            return settled
        return self._committed(results)

    def _transaction(self, ops: list[WriteOp[Any]]) -> list[Any]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            results = self._apply(ops)
            self._conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return results

    def _apply(self, ops: list[WriteOp[Any]]) -> list[Any]:
        return run_sync(apply_all(self._tx, ops))

    def _rollback(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.execute("ROLLBACK")

    def _set_busy_timeout(self, ms: int) -> None:
        if self._busy_timeout_ms != ms:
            self._conn.execute(f"PRAGMA busy_timeout = {ms}")
            self._busy_timeout_ms = ms

    async def _on_thread(self, fn: Any, *args: Any) -> Any:
        loop, thread = self._loop, self._thread
        assert loop is not None
        assert thread is not None
        return await loop.run_in_executor(thread, fn, *args)
