"""Group reads: lookups by key made in the same event-loop turn share one query.

Each trip to aiosqlite's thread costs more than the primary-key lookup it carries; under load
many requests look up conversations in the same turn, so they are answered by one
``WHERE id IN (...)`` query instead of one trip each (the read-side twin of group commit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["BatchedLookup"]

K = TypeVar("K")
V = TypeVar("V")

# SQLite's default limit on bound variables is 32766; stay far below it.
_MAX_KEYS = 500


class BatchedLookup(Generic[K, V]):
    """Coalesce ``get(key)`` calls of one loop turn into one ``fetch(keys)`` call."""

    def __init__(self, fetch: Callable[[Sequence[K]], Awaitable[dict[K, V]]]) -> None:
        self._fetch = fetch
        self._waiting: dict[K, list[asyncio.Future[V | None]]] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.fetches = 0

    def get(self, key: K) -> asyncio.Future[V | None]:
        """Return a future of the value for ``key`` (``None`` if there is none)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[V | None] = loop.create_future()
        self._waiting.setdefault(key, []).append(future)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        waiting, self._waiting = self._waiting, {}
        keys = list(waiting)
        for start in range(0, len(keys), _MAX_KEYS):
            chunk = keys[start : start + _MAX_KEYS]
            task = asyncio.ensure_future(self._answer(chunk, waiting))
            # Kept until done: a task nobody references can be collected mid-flight.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(
        self, keys: list[K], waiting: dict[K, list[asyncio.Future[V | None]]]
    ) -> None:
        self.fetches += 1
        try:
            found = await self._fetch(keys)
        except Exception as exc:
            for key in keys:
                for future in waiting[key]:
                    if not future.done():
                        future.set_exception(exc)
            return
        for key in keys:
            value = found.get(key)
            for future in waiting[key]:
                if not future.done():
                    future.set_result(value)

    async def drain(self) -> None:
        """Wait for lookups in flight (used when closing the store)."""
        while self._tasks or self._scheduled:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:
                await asyncio.sleep(0)
