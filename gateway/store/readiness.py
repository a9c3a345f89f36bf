"""Whether the store takes writes now, for ``GET /readyz``.

An empty transaction (the ping) proves the database answers and grants its write lock, but it
commits on a full disk too: it writes nothing. So the writer remembers when real writes fail
for the store's own reasons (full, read-only, locked, gone: :attr:`GroupCommitWriter.trouble
<gateway.store.writer.GroupCommitWriter.trouble>`), and while they do, each check also writes
a probe, a row of :data:`PROBE_BYTES` inserted and deleted in one transaction: the replica is
ready again as soon as a probe commits, with no traffic needed. Another write committing says
nothing: it may have written nothing (a dispatcher's look that found nothing due, a retried
event's duplicate), which a full disk lets through as it does the ping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import asyncpg
import structlog

from gateway.store.failures import unavailable_reason
from gateway.store.sql import Tx
from gateway.store.writer import GroupCommitWriter, WriteOp

__all__ = ["PROBE_BYTES", "Ping", "Readiness", "WriteProbe"]

log = structlog.get_logger()

# Random, so neither engine can store it in less (PostgreSQL compresses what repeats): a few
# pages to find room for, as a conversion's rows need.
PROBE_BYTES = 16384


class Ping(WriteOp[None]):
    """The writer's own BEGIN / COMMIT: proves the database answers and takes its write lock,
    not that it has room. PostgreSQL is asked too whether the transaction may write: a
    read-only one (a standby, ``default_transaction_read_only``) commits it all the same."""

    async def apply(self, tx: Tx) -> None:
        if tx.engine == "postgresql":
            rows = await tx.fetch("SELECT current_setting('transaction_read_only')")
            if rows[0][0] == "on":
                raise asyncpg.ReadOnlySQLTransactionError("the transaction is read-only")


class WriteProbe(WriteOp[None]):
    """Insert a row of :data:`PROBE_BYTES` and delete it again: commits only where the
    database has room and takes writes. The file keeps its size (the pages are reused)."""

    proves_writable = True

    async def apply(self, tx: Tx) -> None:
        rows = await tx.fetch(
            "INSERT INTO write_probe (pad) VALUES (?) RETURNING pk", (os.urandom(PROBE_BYTES),)
        )
        await tx.execute("DELETE FROM write_probe WHERE pk = ?", (rows[0][0],))


def _retrieved(task: asyncio.Task[None]) -> None:
    """Retrieve a shared write's outcome if no check waits for it any longer (the writer
    noted it)."""
    if not task.cancelled():
        task.exception()


class Readiness:
    """Answers whether the writer's store takes writes; one ping and one probe at a time,
    however many checks arrive together (``/readyz`` needs no key: a check that gives up
    leaves nothing more in the writer's queue)."""

    def __init__(self, writer: GroupCommitWriter) -> None:
        self._writer = writer
        self._ping: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        # What the last check answered, so a change is logged once, not every check.
        self._last: str | None = None

    async def problem(self, timeout_s: float = 2.0) -> str | None:
        """None if the store takes writes, else why not, for an operator: no path, no
        value, nothing of the database's own message. The first check to find it so, and
        the first to find it writable again, log it."""
        found = await self._check(timeout_s)
        if found is not None and self._last is None:
            log.error("store_not_ready", reason=found)
        elif found is None and self._last is not None:
            log.warning("store_ready_again")
        self._last = found
        return found

    async def _check(self, timeout_s: float) -> str | None:
        self._ping = self._shared(self._ping, Ping)
        try:
            await asyncio.wait_for(asyncio.shield(self._ping), timeout_s)
        except TimeoutError:
            return f"the database did not take a write lock within {timeout_s:g} s"
        except Exception as exc:
            return unavailable_reason(exc) or f"not writable ({type(exc).__name__})"
        if self._writer.trouble is None:
            return None
        self._probe = self._shared(self._probe, WriteProbe)
        # However it fails, the writer noted why: its trouble is the answer.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._probe), timeout_s)
        trouble = self._writer.trouble
        if trouble is None:
            return None
        return (
            f"writes have failed for {time.time() - trouble.since:.0f} s: {trouble.reason};"
            " ready again once a write succeeds"
        )

    def _shared(
        self, running: asyncio.Task[None] | None, op: type[Ping | WriteProbe]
    ) -> asyncio.Task[None]:
        """The write of ``op`` in flight, else a new one that later checks join."""
        if running is not None and not running.done():
            return running
        task = asyncio.create_task(self._writer.submit(op()))
        task.add_done_callback(_retrieved)
        return task
