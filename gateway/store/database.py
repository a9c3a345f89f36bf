"""The Store: the queries and writes of conversations and events, and the SQLite engine.

:class:`Store` is the same on both engines: it reads through two
:class:`~gateway.store.sql.Reader` (point lookups, and scans) and writes through a
:class:`~gateway.store.writer.GroupCommitWriter`. :class:`SqliteStore` is the default, one file
(WAL, synchronous=FULL); :class:`gateway.store.postgres.PostgresStore` is the other.

On SQLite one connection writes, on the thread of :class:`~gateway.store.writer.SqliteWriter`.
Reads never queue behind a commit (WAL readers do not wait for the writer) and take one of two
paths: a point lookup by index (the conversation a conversion belongs to, an event by its id)
runs right on the event loop's thread, because it takes microseconds and a trip to another
thread costs more than the query; anything that may read many rows (lists, the outbox, the
archive) goes through aiosqlite's thread so the loop never waits on a scan.

What is stored is what delivery needs: the normalized (hashed) Meta event, never the raw email
or external id a client sent. A conversation keeps the WhatsApp id (the phone number) because
resolving by ``phoneE164`` needs it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import aiosqlite
import msgspec
import structlog

from gateway.capture.records import CaptureBatch, InboundMessage
from gateway.domain import (
    Conversation,
    PhoneMatch,
    SinkState,
    StoredEvent,
)
from gateway.errors import ConfigError
from gateway.hashing import keyed_digest
from gateway.store.archive import (
    ArchivedNotification,
    ArchivePending,
    MarkFailed,
    NewNotification,
    NotificationStatus,
    PruneArchive,
    Reprocess,
    body_of,
    open_notifications,
    status_counts,
)
from gateway.store.capture import CaptureOp, CaptureResult
from gateway.store.datasets import SaveDataset, stored_datasets
from gateway.store.erasure import Erase, redact_notification
from gateway.store.event_insert import InsertEvent
from gateway.store.lookups import ChangeSignal, LookupCache, Touched, tags_of
from gateway.store.outbox import Outbox, count_deliveries
from gateway.store.readiness import Readiness
from gateway.store.reports import Reports
from gateway.store.retention import RetentionCutoffs, in_batches, prune_all
from gateway.store.rows import (
    CONVERSATION_COLUMNS,
    CONVERSATION_FIELDS,
    DELIVERY_COLUMNS,
    DELIVERY_STATE_COLUMNS,
    EVENT_COLUMNS,
    INSERT_CONVERSATION,
    INSERT_DELIVERY,
    conversation_from_row,
    conversation_params,
    delivery_row,
    event_from_row,
)
from gateway.store.schema import UPDATE_EVENT_STATUS, migrate
from gateway.store.sql import (
    Engine,
    Reader,
    SqliteReader,
    Tx,
)
from gateway.store.writer import GroupCommitWriter, SqliteWriter, WriteOp
from gateway.wire import ErasureCounts

__all__ = ["SqliteStore", "Store", "StoreMissing", "check_store_path"]

log = structlog.get_logger()

_ALIASED_COLUMNS = ", ".join(f"c.{field}" for field in CONVERSATION_FIELDS)
# A conversation known by this BSUID: as its own, as its parent, or as a former one.
_BY_BSUID = (
    "(bsuid = ? OR parent_bsuid = ? OR id IN (SELECT conversation_id FROM conversation_aliases"
    " WHERE account_id = ? AND kind = 'bsuid' AND value = ?))"
)


def _without(archive: NewNotification, dropped: Sequence[InboundMessage]) -> NewNotification:
    """The archived notification without these (suppressed) people's messages and contacts."""
    identifiers = frozenset(
        v for m in dropped for v in (m.phone, m.bsuid, m.parent_bsuid, m.wamid) if v
    )
    redacted = redact_notification(archive.body, identifiers)
    return archive if redacted is None else msgspec.structs.replace(archive, body=redacted)


def _best_first(c: Conversation, former: bool = False) -> tuple[bool, bool, float, float, bool]:
    """Sort key: with a click id, then live (a superseded conversation's successor took over
    from it, whatever their message times say), then most recent activity, then newest,
    current number first."""
    activity = c.last_inbound_at if c.last_inbound_at is not None else c.created_at
    return (c.ctwa_clid is None, c.superseded_by is not None, -activity, -c.created_at, former)


# Links followed from a superseded conversation to the one that took over from it.
_MAX_SUCCESSION = 16


def changes_path(path: Path) -> Path:
    """The file the store's processes tell each other about conversation changes in."""
    return Path(f"{path}.changes")


class StoreMissing(ConfigError):
    """A command that must not create a store found none at the configured path."""


_SQLITE_HEADER = b"SQLite format 3\x00"


def check_store_path(path: Path) -> None:
    """Raise ConfigError if ``path`` cannot be the store: a folder, another kind of file, or
    a new file in a folder that cannot be created or written."""
    if path.is_dir():
        raise ConfigError(f"[store] path {path} is a folder; name a file in it")
    if path.exists():
        try:
            with path.open("rb") as file:
                header = file.read(len(_SQLITE_HEADER))
        except OSError as exc:
            raise ConfigError(f"[store] path {path}: cannot read it ({exc.strerror})") from None
        if header and header != _SQLITE_HEADER:
            raise ConfigError(f"[store] path {path} is not an SQLite database")
        return
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"[store] path {path}: its folder cannot be created or written")


class _InsertConversation(WriteOp[None]):
    inline = True

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation

    async def apply(self, tx: Tx) -> None:
        await tx.execute(INSERT_CONVERSATION, conversation_params(self.conversation))

    def touched(self) -> Touched | None:
        c = self.conversation
        return frozenset(
            tags_of(
                c.account_id,
                conversation_id=c.id,
                phones=[c.wa_id],
                bsuids=[c.bsuid, c.parent_bsuid],
            )
        )


class _PruneMessages(WriteOp[int]):
    """Forget up to ``limit`` of the webhook message ids received before ``before``."""

    def __init__(self, before: float, limit: int) -> None:
        self.before, self.limit = before, limit

    async def apply(self, tx: Tx) -> int:
        return await tx.execute(
            "DELETE FROM webhook_messages WHERE wamid IN (SELECT wamid FROM webhook_messages"
            " WHERE received_at < ? LIMIT ?)",
            (self.before, self.limit),
        )


class _UpdateDeliveries(WriteOp[None]):
    """Replace some sinks' states of one event and recompute the event's status."""

    inline = True

    def __init__(self, pk: int, states: dict[str, SinkState]) -> None:
        self.pk = pk
        self.states = states

    async def apply(self, tx: Tx) -> None:
        now = time.time()
        had = {row[0] for row in await tx.fetch(_SINKS_OF, (self.pk,))}
        # An upsert, not a REPLACE: a replaced row's deletion fires no trigger, and
        # delivery_counts follows status changes through one.
        await tx.executemany(
            _UPSERT_DELIVERY,
            [delivery_row(self.pk, sink, state, now) for sink, state in self.states.items()],
        )
        new = [(sink, state.status) for sink, state in self.states.items() if sink not in had]
        if new:
            rows = await tx.fetch("SELECT account_id FROM events WHERE pk = ?", (self.pk,))
            account_id = rows[0][0]
            await count_deliveries(tx, [(account_id, sink, status) for sink, status in new])
        await tx.execute(UPDATE_EVENT_STATUS, (self.pk, self.pk))


_SINKS_OF = "SELECT sink FROM deliveries WHERE event_pk = ?"
_UPSERT_DELIVERY = f"{INSERT_DELIVERY} ON CONFLICT (event_pk, sink) DO UPDATE SET " + ", ".join(
    f"{column} = excluded.{column}"
    for column in DELIVERY_COLUMNS.replace(" ", "").split(",")
    if column not in ("event_pk", "sink")
)


class Store:
    """Conversations and events, in SQLite (:class:`SqliteStore`) or PostgreSQL
    (:class:`gateway.store.postgres.PostgresStore`): the same queries and writes over each
    engine's readers and writer."""

    def __init__(
        self, *, writer: GroupCommitWriter, quick: Reader, scan: Reader, lookups: LookupCache
    ) -> None:
        self.engine: Engine = quick.engine
        # Point lookups: a handful of rows by index (see the module's docstring).
        self._quick = quick
        # Anything that may read many rows.
        self._reader = scan
        self.lookups = lookups
        self.writer = writer
        # Whether writes go through now (/readyz).
        self.readiness = Readiness(writer)
        self.outbox = Outbox(scan, writer)
        self.reports = Reports(scan)
        # (account, kind, keyed digest) of suppressed people: checked on every capture and
        # conversion, so kept in memory and reloaded after an erasure and at housekeeping.
        self.suppressed: set[tuple[str, str, str]] = set()
        # The secret those digests are made with (set by the runtime from the environment).
        self.suppression_key: bytes | None = None
        # Checkpoints an erasure left to retry (readers were in the way).
        self._checkpoints: set[asyncio.Task[None]] = set()

    def is_suppressed(self, account_id: str, kind: str, values: Iterable[str | None]) -> bool:
        """Whether any of ``values`` (phones in WhatsApp's digits, or BSUIDs) is suppressed."""
        key = self.suppression_key
        if not self.suppressed or key is None:
            return False
        return any(
            (account_id, kind, keyed_digest(key, kind, value)) in self.suppressed
            for value in values
            if value
        )

    async def apply_retention(self, cutoffs: RetentionCutoffs, batch_rows: int) -> dict[str, int]:
        """Prune events, clicks and conversations past their cutoffs, ``batch_rows`` a
        transaction; return how many rows each rule removed."""
        return await prune_all(self.writer, cutoffs, batch_rows)

    async def erase(
        self,
        *,
        account_id: str,
        waba_id: str,
        phone_number_id: str,
        kind: str,
        phones: Sequence[str],
        bsuids: Sequence[str],
        conversation_ids: Sequence[str],
        actor: str,
        suppress: bool,
    ) -> tuple[int, ErasureCounts, bool]:
        """Erase one person (:class:`gateway.store.erasure.Erase`) and, if ``suppress``, record
        their suppression; then checkpoint so their old pages leave the write-ahead log.
        Return the audit row's id, the counts, and whether the file is already clear of them
        (else a checkpoint is retried in the background until it is)."""
        erasure_id, counts = await self.writer.submit(
            Erase(
                account_id=account_id,
                waba_id=waba_id,
                phone_number_id=phone_number_id,
                phones=phones,
                bsuids=bsuids,
                conversation_ids=conversation_ids,
                actor=actor,
                kind=kind,
                suppress_key=self.suppression_key if suppress else None,
            )
        )
        if suppress:
            await self.load_suppressions()
        try:
            cleared = await self.checkpoint(busy_timeout_ms=250)
        except Exception:
            # The erasure is committed: a checkpoint that failed (a VACUUM behind a lock, say)
            # leaves old row versions for later, and must not answer "nothing was done".
            log.exception("erasure_checkpoint_failed", erasure_id=erasure_id)
            cleared = False
        if not cleared and self.checkpoint_clears:
            log.warning("erasure_checkpoint_pending", erasure_id=erasure_id)
            self._checkpoints.add(asyncio.create_task(self._checkpoint_until_done(erasure_id)))
        return erasure_id, counts, cleared

    async def _checkpoint_until_done(self, erasure_id: int) -> None:
        """Retry the checkpoint (readers were in the way) until the file is clear."""
        for _ in range(720):  # an hour; housekeeping checkpoints as well
            await asyncio.sleep(5.0)
            if await self.checkpoint(busy_timeout_ms=250):
                log.info("erasure_checkpoint_done", erasure_id=erasure_id)
                return
        log.error("erasure_checkpoint_failed", erasure_id=erasure_id)

    # Whether checkpoint() can make the files clear of deleted rows, so that a checkpoint
    # readers held back is worth retrying.
    checkpoint_clears: ClassVar[bool] = True

    async def checkpoint(self, *, busy_timeout_ms: int = 5000) -> bool:
        """Make deleted and overwritten rows leave the database's files; return whether
        they fully did (an engine with nothing to do says so)."""
        return True

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run a read-only query (``?`` placeholders) and return its rows: for tools that
        read whole tables (``store copy``) and for tests."""
        return await self._reader.fetch(sql, params)

    async def size_bytes(self) -> int:
        """Return how much disk the store takes."""
        raise NotImplementedError

    async def load_suppressions(self) -> None:
        """Read the suppressed digests (at open, after an erasure, and at housekeeping)."""
        rows = await self._reader.fetch("SELECT account_id, kind, digest FROM suppressions", ())
        self.suppressed = {(row[0], row[1], row[2]) for row in rows}

    async def prune_messages(self, before: float, batch_rows: int = 500) -> int:
        """Forget webhook message ids received before ``before``, ``batch_rows`` a transaction
        (conversions' commits wait for none of them long); return how many."""
        return await in_batches(self.writer, lambda: _PruneMessages(before, batch_rows), batch_rows)

    async def close(self) -> None:
        """Flush pending writes and close the connections."""
        for task in self._checkpoints:
            task.cancel()
        await self.writer.close()
        await self._closed()

    async def _closed(self) -> None:
        """Close what the engine holds (the writer has flushed)."""

    # -- conversations -------------------------------------------------------------------

    async def add_conversation(self, conversation: Conversation) -> Conversation:
        """Store a new conversation (the webhook's job; tests use it directly)."""
        await self.writer.submit(_InsertConversation(conversation))
        return conversation

    async def capture(
        self,
        batch: CaptureBatch,
        *,
        window_s: int,
        archive: NewNotification | Reprocess | None = None,
    ) -> CaptureResult:
        """Apply a webhook notification's records, and archive it, in one transaction.

        Messages from a suppressed person are dropped first: no conversation, no click."""
        if self.suppressed:
            kept = [
                m
                for m in batch.messages
                if not self.is_suppressed(m.account_id, "phone", [m.phone])
                and not self.is_suppressed(m.account_id, "bsuid", [m.bsuid, m.parent_bsuid])
            ]
            if len(kept) != len(batch.messages):
                dropped = [m for m in batch.messages if m not in kept]
                log.info("webhook_suppressed", messages=len(dropped))
                batch = msgspec.structs.replace(batch, messages=kept)
                if isinstance(archive, NewNotification):
                    # Not even the archive keeps what they wrote.
                    archive = _without(archive, dropped)
        return await self.writer.submit(CaptureOp(batch, window_s=window_s, archive=archive))

    # -- the webhook archive ---------------------------------------------------------------

    async def archive_pending(self, new: NewNotification, *, error: str) -> int:
        """Archive a notification whose processing failed; return its id."""
        return await self.writer.submit(ArchivePending(new, error))

    async def mark_reprocess_failed(self, pk: int, error: str) -> None:
        """Count a failed attempt at processing an archived notification again."""
        await self.writer.submit(MarkFailed(pk, error))

    async def prune_archive(self, before: float, batch_rows: int = 500) -> int:
        """Forget archived notifications received before ``before``, ``batch_rows`` a
        transaction; return how many."""
        return await in_batches(self.writer, lambda: PruneArchive(before, batch_rows), batch_rows)

    async def open_notifications(
        self,
        *,
        since: float = 0.0,
        accounts: Sequence[tuple[str, str]] | None = None,
        statuses: Sequence[NotificationStatus] = ("partial", "pending"),
        limit: int = 100,
        after_pk: int = 0,
        before: float | None = None,
    ) -> list[ArchivedNotification]:
        """Return archived notifications that are not fully processed, oldest first."""
        return await open_notifications(
            self._reader,
            since=since,
            accounts=accounts,
            statuses=statuses,
            limit=limit,
            before=before,
            after_pk=after_pk,
        )

    async def notification_body(self, pk: int) -> bytes | None:
        """Return an archived notification's bytes, as received."""
        return await body_of(self._reader, pk)

    async def archive_counts(self) -> dict[str, int]:
        """Return how many archived notifications are partial and pending."""
        return await status_counts(self._reader)

    async def get_conversation(self, account_id: str, conversation_id: str) -> Conversation | None:
        """Return the conversation with this id on this account."""
        conversation = await self._conversation(conversation_id)
        if conversation is None or conversation.account_id != account_id:
            return None
        return conversation

    async def _conversation(self, conversation_id: str) -> Conversation | None:
        key = ("id", conversation_id)
        known, found = self.lookups.get(key)
        if known:
            return found  # type: ignore[no-any-return]
        rows = await self._quick.fetch(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?",
            (conversation_id,),
        )
        conversation = conversation_from_row(rows[0]) if rows else None
        self.lookups.put(key, conversation, [key])
        return conversation

    async def _successor(self, c: Conversation) -> Conversation | None:
        """The live conversation that took over from a superseded one (a merge, a click on a
        new ad after the window), following the links; None for a live one.

        Never across a recycled number: a conversation whose phone was released is
        superseded by the number's new owner's, someone else (as erasure holds too)."""
        hops = 0
        while c.superseded_by is not None and hops < _MAX_SUCCESSION:
            if c.phone_released_at is not None:
                return None
            following = await self._conversation(c.superseded_by)
            if following is None or following.account_id != c.account_id:
                return None
            c, hops = following, hops + 1
        return c if hops and c.superseded_by is None else None

    async def conversations_for_phones(
        self, account_id: str, phones: Sequence[str]
    ) -> list[PhoneMatch]:
        """Return the conversations known by any of these phones, best first: with a click,
        then live, then most recent. A number that was the person's before a change matches
        through its alias; a recycled number's previous owner does not match at all. A
        superseded conversation brings the one that took over from it along (matched as it
        was): the person's number, old or current, finds where they are now."""
        key = ("phones", account_id, *phones)
        known, cached = self.lookups.get(key)
        if known:
            return cached  # type: ignore[no-any-return]
        marks = ",".join("?" * len(phones))
        rows = await self._quick.fetch(
            f"SELECT {CONVERSATION_COLUMNS}, wa_id AS matched, 0 AS former,"
            " NULL AS replaced FROM conversations"
            f" WHERE account_id = ? AND wa_id IN ({marks}) AND phone_released_at IS NULL"
            f" UNION ALL SELECT {_ALIASED_COLUMNS}, a.value, 1, a.replaced_at"
            " FROM conversation_aliases a"
            " JOIN conversations c ON c.id = a.conversation_id"
            f" WHERE a.account_id = ? AND a.kind = 'phone' AND a.value IN ({marks})",
            [account_id, *phones, account_id, *phones],
        )
        width = len(CONVERSATION_FIELDS)
        matches = [
            PhoneMatch(conversation_from_row(row[:width]), row[width], bool(row[width + 1]),
                       row[width + 2])
            for row in rows
        ]  # fmt: skip
        for m in list(matches):
            live = await self._successor(m.conversation)
            if live is not None:
                matches.append(m._replace(conversation=live))
        # A handful of rows: sorted here rather than through SQLite's temporary B-tree.
        matches.sort(key=lambda m: _best_first(m.conversation, m.former))
        seen: set[str] = set()
        found = []
        for m in matches:
            if m.conversation.id not in seen:
                seen.add(m.conversation.id)
                found.append(m)
        tags = tags_of(account_id, phones=phones)
        tags.update(("id", m.conversation.id) for m in matches)
        self.lookups.put(key, found, tags)
        return found

    async def find_conversation(self, conversation_id: str) -> Conversation | None:
        """Return the conversation with this id, whatever its account."""
        return await self._conversation(conversation_id)

    async def latest_conversation_for_bsuid(
        self, account_id: str, bsuid: str
    ) -> Conversation | None:
        """Return the most recent conversation with a click id of this BSUID (or parent BSUID,
        or former BSUID), else the most recent one."""
        key = ("bsuid", account_id, bsuid)
        known, cached = self.lookups.get(key)
        if known:
            return cached  # type: ignore[no-any-return]
        rows = await self._quick.fetch(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations"
            f" WHERE account_id = ? AND {_BY_BSUID}",
            (account_id, bsuid, bsuid, account_id, bsuid),
        )
        candidates = [conversation_from_row(row) for row in rows]
        # As by phone: a superseded conversation brings its successor along.
        for c in list(candidates):
            live = await self._successor(c)
            if live is not None:
                candidates.append(live)
        found = min(candidates, key=_best_first, default=None)
        tags = tags_of(account_id, bsuids=[bsuid])
        tags.update(("id", c.id) for c in candidates)
        self.lookups.put(key, found, tags)
        return found

    async def recent_conversations(
        self,
        account_id: str,
        *,
        wa_id: str | None = None,
        bsuid: str | None = None,
        limit: int,
    ) -> list[Conversation]:
        """Return the account's conversations, newest first; for one phone and/or BSUID
        (current or former), if given."""
        where, params = "account_id = ?", [account_id]
        if wa_id is not None:
            where += " AND (wa_id = ? OR id IN (SELECT conversation_id FROM conversation_aliases"
            where += " WHERE account_id = ? AND kind = 'phone' AND value = ?))"
            params += [wa_id, account_id, wa_id]
        if bsuid is not None:
            where += f" AND {_BY_BSUID}"
            params += [bsuid, bsuid, account_id, bsuid]
        rows = await self._reader.fetch(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE {where}"
            # Ties in time: the later insert first (SQLite's rowid; PostgreSQL has no such
            # order, and the random ids make any order a stable one).
            f" ORDER BY created_at DESC, {'rowid' if self.engine == 'sqlite' else 'id'} DESC"
            " LIMIT ?",
            [*params, limit],
        )
        return [conversation_from_row(row) for row in rows]

    # -- events ----------------------------------------------------------------------------

    async def insert_event(self, new: StoredEvent) -> tuple[StoredEvent, bool]:
        """Store ``new`` (its ``pk`` and ``status`` are ignored) unless its eventId exists on
        its account; return the stored event and ``duplicate``."""
        op = InsertEvent(new)
        pk, duplicate = await self.writer.submit(op)
        if duplicate:
            existing = await self._event_by_pk(pk)
            assert existing is not None  # rows are never deleted
            return existing, True
        return msgspec.structs.replace(op.new, pk=pk, deliveries=dict(new.deliveries)), False

    # -- the dataset registry --------------------------------------------------------------

    async def datasets(self) -> dict[str, str]:
        """Return the Meta dataset id stored per account (``POST /v1/whatsapp/dataset``)."""
        return await stored_datasets(self._reader)

    async def save_dataset(self, account_id: str, dataset_id: str) -> None:
        """Remember an account's dataset id."""
        await self.writer.submit(SaveDataset(account_id, dataset_id))

    async def update_deliveries(self, pk: int, states: dict[str, SinkState]) -> None:
        """Store new states for some of an event's sinks."""
        await self.writer.submit(_UpdateDeliveries(pk, states))

    async def find_event(self, account_id: str, event_id: str) -> StoredEvent | None:
        """Return the stored event with this eventId on this account."""
        rows = await self._quick.fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE account_id = ? AND event_id = ?",
            (account_id, event_id),
        )
        return await self._with_deliveries(rows[0]) if rows else None

    async def recent_events(self, account_id: str, limit: int) -> list[StoredEvent]:
        """Return the account's most recent events, newest first."""
        rows = await self._reader.fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE account_id = ? ORDER BY pk DESC LIMIT ?",
            (account_id, limit),
        )
        return await self._scan_with_deliveries(rows)

    async def events_matching(
        self, where: str, params: Sequence[Any], limit: int
    ) -> list[StoredEvent]:
        """Return the events that match a condition on the events table, newest first."""
        rows = await self._reader.fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE {where} ORDER BY pk DESC LIMIT ?",
            [*params, limit],
        )
        return await self._scan_with_deliveries(rows)

    async def _scan_with_deliveries(self, rows: list[Any]) -> list[StoredEvent]:
        if not rows:
            return []
        pks = [row[0] for row in rows]
        found = await self._reader.fetch(
            f"SELECT event_pk, sink, {DELIVERY_STATE_COLUMNS} FROM deliveries"
            f" WHERE event_pk IN ({','.join('?' * len(pks))})",
            pks,
        )
        sinks: dict[int, list[Any]] = {pk: [] for pk in pks}
        for pk, *state in found:
            sinks[pk].append(state)
        return [event_from_row(row, sinks[row[0]]) for row in rows]

    async def _event_by_pk(self, pk: int) -> StoredEvent | None:
        rows = await self._quick.fetch(f"SELECT {EVENT_COLUMNS} FROM events WHERE pk = ?", (pk,))
        return await self._with_deliveries(rows[0]) if rows else None

    async def _with_deliveries(self, row: Any) -> StoredEvent:
        found = await self._quick.fetch(
            f"SELECT sink, {DELIVERY_STATE_COLUMNS} FROM deliveries WHERE event_pk = ?",
            (row[0],),
        )
        return event_from_row(row, found)


class SqliteStore(Store):
    """The store in one SQLite file (WAL, synchronous=FULL): the default, and the quick start.

    Point lookups run right on the loop's thread (a :class:`QuickReader`), scans on
    aiosqlite's, writes through :class:`~gateway.store.writer.SqliteWriter`."""

    def __init__(
        self,
        path: Path,
        writer_conn: sqlite3.Connection,
        quick_conn: sqlite3.Connection,
        scan_conn: aiosqlite.Connection,
        *,
        max_batch: int,
    ) -> None:
        lookups = LookupCache(ChangeSignal(changes_path(path)))
        super().__init__(
            writer=SqliteWriter(writer_conn, max_batch=max_batch, on_touched=lookups.touched),
            quick=QuickReader(quick_conn),
            scan=SqliteReader(scan_conn),
            lookups=lookups,
        )
        self.path = path
        self._writer_conn = writer_conn
        self._quick_conn = quick_conn
        self._scan_conn = scan_conn

    @classmethod
    async def open(
        cls, path: str | Path, *, max_batch: int = 1000, create: bool = True
    ) -> SqliteStore:
        """Open (creating if needed, unless ``create`` is false) and migrate the database, and
        start the writer. The files hold phone numbers, BSUIDs and click ids: a new folder is
        0700 and a new database 0600 (SQLite gives its -wal and -shm files the same mode)."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise StoreMissing(f"no store at {path}: check [store] path (nothing was created)")
            if not path.parent.exists():
                path.parent.mkdir(mode=0o700, parents=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        for file in (path.parent, path, *(Path(f"{path}{s}") for s in ("-wal", "-shm"))):
            mode = file.stat().st_mode if file.exists() else 0
            if mode & 0o077:
                log.warning(
                    "store_file_not_private",
                    path=str(file),
                    mode=oct(stat.S_IMODE(mode)),
                    fix=f"chmod {'700' if file.is_dir() else '600'} {file}",
                )
        try:
            # Opened and migrated here (start-up, nothing else is running yet); written from
            # the writer's thread afterwards, never from two threads at once. Its statement
            # cache holds a group commit's multi-row INSERTs for each batch size that comes
            # (one per size and table): at the module's default of 128, 64 connections'
            # batches pushed them out of it, and preparing one again costs as much as
            # inserting a few dozen rows.
            writer = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, cached_statements=256
            )
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the store {path}: {exc}") from None
        quick: sqlite3.Connection | None = None
        try:
            writer.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is on disk (WAL fsynced) before any caller hears "accepted".
            writer.execute("PRAGMA synchronous = FULL")
            writer.execute("PRAGMA busy_timeout = 5000")
            writer.execute("PRAGMA foreign_keys = ON")
            # Deleted rows are overwritten, not left in free pages: an erased person's data
            # must be gone from the file, not only from the tables.
            writer.execute("PRAGMA secure_delete = ON")
            migrate(writer)
            # After migrating: an index built over millions of old rows sorts on disk, as
            # SQLite does by default. From here on, a group commit's multi-row INSERT keeps
            # a statement journal (to undo it alone if it fails); past 64 KiB SQLite moves
            # it to a temporary file, which a busy store did on about every commit (an open,
            # an unlink and a dozen writes). In memory it costs none of those: about 6 us of
            # system time per conversion on the benchmark. The writer's other work
            # (retention, erasure, requeues) was measured on a million events: no more memory.
            writer.execute("PRAGMA temp_store = MEMORY")
            quick = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # A WAL reader waits only in rare moments (another connection recovering the
            # log); the loop waits with it, so briefly, and then the request fails with 503.
            quick.execute("PRAGMA busy_timeout = 250")
            quick.execute("PRAGMA query_only = ON")
            scanner = await aiosqlite.connect(path, isolation_level=None)
        except BaseException as exc:
            writer.close()
            if quick is not None:
                quick.close()
            if isinstance(exc, sqlite3.DatabaseError | ConfigError):
                # Not a database, a damaged one, or a newer version's: one line, not a
                # traceback.
                raise ConfigError(f"cannot open the store {path}: {exc}") from None
            raise
        await scanner.execute("PRAGMA busy_timeout = 5000")
        await scanner.execute("PRAGMA query_only = ON")
        store = cls(path, writer, quick, scanner, max_batch=max_batch)
        store.writer.start()
        await store.load_suppressions()
        return store

    async def checkpoint(self, *, busy_timeout_ms: int = 5000) -> bool:
        """Move the write-ahead log into the database file and truncate it; return whether it
        fully did (a reader holding an old snapshot keeps frames in the log)."""
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            rows = await SqliteReader(conn).fetch("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError:
            return False
        finally:
            await conn.close()
        return bool(rows) and rows[0][0] == 0

    async def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except OSError:
                continue
        return total

    async def _closed(self) -> None:
        await self._scan_conn.close()
        self._quick_conn.close()
        self._writer_conn.close()
        if self.lookups.signal is not None:
            self.lookups.signal.close()


class QuickReader:
    """A :class:`~gateway.store.sql.Reader` that runs its query right away on the caller's
    thread (the loop's): for point lookups, where a trip to another thread costs more than the
    query. The coroutine never suspends."""

    engine: Engine = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self.conn.execute(sql, params).fetchall()
