"""The single SQLite writer: group commit for every write the gateway makes.

Many requests' writes share one transaction (and so one fsync): while a batch commits, the
next requests queue up, and the next batch takes them all. A caller's future resolves only
after the transaction holding its write has committed, so no response leaves before its row
is on disk. One failing write does not fail its neighbours: the batch is rolled back and
each write is then tried in a transaction of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import aiosqlite
import structlog

__all__ = ["GroupCommitWriter", "WriteOp"]

T = TypeVar("T")
log = structlog.get_logger()


class WriteOp(Generic[T]):
    """One unit of writing; subclasses override :meth:`apply` or :meth:`apply_many`."""

    async def apply(self, conn: aiosqlite.Connection) -> T:
        """Write inside the open transaction and return this op's result."""
        raise NotImplementedError

    @classmethod
    async def apply_many(cls, conn: aiosqlite.Connection, ops: Sequence[WriteOp[Any]]) -> list[Any]:
        """Write several ops of this class at once; override to batch statements."""
        return [await op.apply(conn) for op in ops]


class GroupCommitWriter:
    """Owns the write connection; :meth:`submit` is the only way to write."""

    def __init__(self, conn: aiosqlite.Connection, *, max_batch: int = 1000) -> None:
        self._conn = conn
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[WriteOp[Any], asyncio.Future[Any]] | None] = (
            asyncio.Queue()
        )
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0
        self.ops = 0

    def start(self) -> None:
        """Start the writer task; call once, from a running loop."""
        self._task = asyncio.create_task(self._run(), name="ctwa-gateway-writer")

    async def submit(self, op: WriteOp[T]) -> T:
        """Queue ``op`` and wait until the transaction holding it has committed."""
        if self._closing or self._task is None:
            raise RuntimeError("the store writer is not running")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, fut))
        return await fut

    async def close(self) -> None:
        """Let queued writes commit, then stop."""
        if self._task is None or self._closing:
            return
        self._closing = True
        self._queue.put_nowait(None)
        await self._task

    async def _run(self) -> None:
        stop = False
        while not stop:
            item = await self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self._max_batch and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            await self._commit(batch)

    async def _commit(self, batch: list[tuple[WriteOp[Any], asyncio.Future[Any]]]) -> None:
        try:
            results = await self._transaction([op for op, _ in batch])
        except Exception:
            # Isolate the failure: every op gets its own transaction and its own outcome.
            for op, fut in batch:
                try:
                    (result,) = await self._transaction([op])
                except Exception as exc:
                    if not fut.done():
                        fut.set_exception(exc)
                else:
                    if not fut.done():
                        fut.set_result(result)
            return
        self.batches += 1
        self.ops += len(batch)
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    async def _transaction(self, ops: list[WriteOp[Any]]) -> list[Any]:
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            results: list[Any] = []
            i = 0
            # Consecutive ops of one class are applied together, so they can share statements.
            while i < len(ops):
                j = i
                while j < len(ops) and type(ops[j]) is type(ops[i]):
                    j += 1
                results.extend(await type(ops[i]).apply_many(self._conn, ops[i:j]))
                i = j
            await self._conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                await self._conn.execute("ROLLBACK")
            raise
        return results
