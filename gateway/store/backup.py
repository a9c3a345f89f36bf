"""Online backups, verified restores, and what the store holds (``ctwa-gateway backup``,
``restore``, ``stats --store``).

A backup uses SQLite's backup API: a consistent copy taken in one read transaction while the
gateway keeps writing, never a file copy (which could catch the database and its write-ahead
log at different moments). A restore verifies the copy first (integrity check, a schema this
version knows) and refuses to run while a gateway serves the store.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from gateway.errors import ConfigError, UsageError
from gateway.store.database import check_store_path
from gateway.store.locks import serving_lock
from gateway.store.schema import MIGRATIONS, UPDATE_EVENT_STATUS

__all__ = ["Restored", "backup", "erasures_after", "restore", "store_stats", "verify"]

# The age of the oldest row of each kind of data: (table, time column).
_OLDEST = {
    "conversations": "created_at",
    "events": "received_at",
    "delivery_attempts": "at",
    "webhook_messages": "received_at",
    "webhook_notifications": "received_at",
    "automatic_events": "received_at",
    "erasures": "at",
}


# What every store has had since its first migration.
_REQUIRED_TABLES = frozenset({"schema_migrations", "conversations", "events", "deliveries"})


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def backup(store: Path, target: Path) -> int:
    """Copy the live store to ``target`` (private to the user); return its size in bytes."""
    if not store.exists():
        raise ConfigError(f"no store at {store}: check [store] path")
    if not target.parent.is_dir():
        raise UsageError(f"cannot write {target}: {target.parent} is not a folder")
    if target.is_dir():
        raise UsageError(
            f"{target} is a folder: name the backup file, e.g. {target / 'ctwa.sqlite3'}"
        )
    # The copy replaces a file it names; never a device or a pipe (``backup /dev/null`` as
    # root replaced the host's /dev/null with a copy of the store), nor what a link points at.
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise UsageError(
            f"{target} exists and is not a regular file (a device, a pipe, a link):"
            " name a new file or an earlier backup"
        )
    # Replacing the live store (or a file beside it) would swap a copy in under a serving
    # gateway, which goes on writing to the file it has open: what it answers after is lost.
    if target.resolve() in _store_files(store):
        raise UsageError(
            f"{target} is the store itself (or one of its files): back it up elsewhere"
        )
    _check_readable(store)
    partial = target.with_name(target.name + ".partial")
    try:
        partial.unlink(missing_ok=True)
        try:
            _copy(store, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)  # a copy that failed leaves nothing behind
    except (OSError, sqlite3.Error) as exc:
        # A full disk, a read-only or someone else's folder: one line, not a traceback.
        raise UsageError(
            f"cannot write {target}: {_reason(exc)}; an earlier backup there is left as it was"
        ) from None
    return target.stat().st_size


def _reason(exc: OSError | sqlite3.Error) -> str:
    """What went wrong, without the path the message already names."""
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)


def _check_readable(store: Path) -> None:
    """Raise UsageError if this user cannot read the store (before blaming anything else)."""
    check_store_path(store)  # a folder, or a file that is no SQLite database: say so
    try:
        conn = _connect(store)
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        # A reader of a store in WAL mode writes its -shm file: a read-only folder, or
        # another user's, cannot be read either ("unable to open database file").
        fix = (
            f"reading it needs write access to {store.parent} too (SQLite's shared-memory"
            " file): run it as the gateway's user"
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_CANTOPEN"
            else "check [store] path"
        )
        raise UsageError(f"cannot read the store {store}: {exc}; {fix}") from None


def _store_files(store: Path) -> set[Path]:
    """The store's file and every file SQLite and the gateway keep beside it."""
    main = store.resolve()
    return {main, *(main.with_name(main.name + s) for s in _SIDE_FILES)}


_SIDE_FILES = ("-wal", "-shm", "-journal", ".lock", ".changes")


def _copy(store: Path, target: Path) -> None:
    """Copy the store into ``target``, a file private to the user."""
    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
    source = _connect(store)
    try:
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)  # all pages in one step: one consistent snapshot
            copy.execute("PRAGMA journal_mode = DELETE")  # a single self-contained file
        finally:
            copy.close()
    finally:
        source.close()


def verify(path: Path) -> int:
    """Check a backup before it is trusted; return its schema version, or raise ConfigError."""
    if not path.is_file():
        raise ConfigError(f"no backup at {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            (result,) = conn.execute("PRAGMA integrity_check").fetchone()
            (version,) = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
            tables = {
                row[0]
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{path} is not a ctwa-gateway store: {exc}") from None
    if result != "ok":
        raise ConfigError(f"{path} is damaged: integrity check says {result!r}")
    missing = _REQUIRED_TABLES - tables
    if missing:
        raise ConfigError(
            f"{path} is not a ctwa-gateway store: it has no {', '.join(sorted(missing))} table"
        )
    if version is None or version > len(MIGRATIONS):
        raise ConfigError(
            f"{path} has schema version {version}; this version knows up to {len(MIGRATIONS)}:"
            " restore it with the version that made it"
        )
    return int(version)


class Restored(NamedTuple):
    """What a restore did: the backup's schema version, and where the replaced store is kept
    (None if there was none)."""

    version: int
    aside: Path | None


def restore(backup_path: Path, store: Path) -> Restored:
    """Replace the store's contents with a verified backup."""
    version = verify(backup_path)
    if store.is_dir():
        raise ConfigError(f"[store] path {store} is a folder; name a file in it")
    # A fresh host has no folder yet, and the lock file lives in it.
    if not store.parent.exists():
        store.parent.mkdir(mode=0o700, parents=True)
    lock = serving_lock(store, shared=False)
    try:
        free = lock.acquire()
    except OSError as exc:
        raise UsageError(
            f"cannot restore into {store}: {_reason(exc)}; restore needs write access to"
            f" {store.parent}: run it as the gateway's user"
        ) from None
    if not free:
        raise ConfigError(
            f"a gateway is serving {store}: stop it (systemctl stop ctwa-gateway), then restore"
        )
    aside = None
    try:
        made = not store.exists()
        if not made:
            # Kept until the operator removes it: a restore must never lose the only copy.
            aside = _unused(store.with_name(f"{store.name}.before-restore-{int(time.time())}"))
            made = _keep_aside(store, aside)
        try:
            if made:
                os.close(os.open(store, os.O_CREAT | os.O_WRONLY, 0o600))
            _replace_contents(backup_path, store)
        except (OSError, sqlite3.Error) as exc:
            # SQLite swaps the pages in one transaction: the store is the old one or the
            # backup, whole, and a restore run again starts over.
            if made:  # the store this made: none, as before
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(f"{store}{suffix}").unlink(missing_ok=True)
            kept = "" if aside is None else f" (the store it replaced is kept at {aside})"
            raise UsageError(
                f"cannot restore into {store}: {_reason(exc)}; make room (or give write access)"
                f" in {store.parent}, then restore again{kept}"
            ) from None
    finally:
        lock.release()
    return Restored(version, aside)


def _unused(path: Path) -> Path:
    """``path``, or else ``path-2``, ``path-3``...: the first name no file has. A restore in
    the same second as the last must not write over the store that one kept aside."""
    candidate, n = path, 1
    while candidate.exists() or Path(f"{candidate}-wal").exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


# What SQLite says of a file that is no database, or a damaged one: what a restore is for.
_DAMAGED = frozenset({"SQLITE_NOTADB", "SQLITE_CORRUPT"})


def _keep_aside(store: Path, aside: Path) -> bool:
    """Copy the store to ``aside``. A damaged store is kept as its bytes and taken out of the
    way: return True, and the backup goes into a new file."""
    try:
        try:
            _copy(store, aside)
            return False
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "") not in _DAMAGED:
                raise
            aside.unlink()  # what the copy began
        for suffix in ("", "-wal"):  # its log beside it, as SQLite would pair them
            if Path(f"{store}{suffix}").exists():
                _copy_bytes(Path(f"{store}{suffix}"), Path(f"{aside}{suffix}"))
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{store}{suffix}").unlink(missing_ok=True)
        return True
    except (OSError, sqlite3.Error) as exc:
        for suffix in ("", "-wal"):
            Path(f"{aside}{suffix}").unlink(missing_ok=True)  # a half copy is no copy
        raise UsageError(
            f"cannot keep the current store aside at {aside}: {_reason(exc)};"
            f" nothing was changed: make room (or give write access) in {store.parent},"
            " then restore again"
        ) from None


def _copy_bytes(source: Path, target: Path) -> None:
    """Copy a file as it is into a new file private to the user."""
    with (
        source.open("rb") as read,
        open(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "wb") as write,
    ):
        shutil.copyfileobj(read, write)


def _replace_contents(backup_path: Path, store: Path) -> None:
    """Copy the backup's pages over the store's, in one transaction."""
    source = sqlite3.connect(f"file:{backup_path}?mode=ro", uri=True)
    try:
        target = _connect(store)
        try:
            target.execute("PRAGMA journal_mode = WAL")
            source.backup(target)
            target.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            target.close()
    finally:
        source.close()


def erasures_after(replaced: Path, restored: Path) -> list[tuple[int, float, str]] | None:
    """The erasures (audit id, time, account) the replaced store recorded after the newest one
    the restored store has: the people they erased are in the restored store again, and
    the audit log keeps no identities to erase them by, so the operator must repeat them.
    ``None`` if the replaced store cannot be read (a damaged one): nobody can tell."""
    newest = _read_one(restored, "SELECT COALESCE(MAX(at), 0) FROM erasures")
    conn = sqlite3.connect(f"file:{replaced}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT pk, at, account_id FROM erasures WHERE at > ? ORDER BY pk", (newest,)
        ).fetchall()
    except sqlite3.DatabaseError:
        return None  # a restore onto a damaged file: what it erased cannot be read
    finally:
        conn.close()
    return [(int(pk), float(at), str(account)) for pk, at, account in rows]


def carry_deliveries(replaced: Path, restored: Path) -> dict[str, int] | None:
    """Take over, from the store a restore replaced, the deliveries it made that the restored
    one still has pending (per sink, how many): the destination has them, and Meta does not
    deduplicate, so sending them again would count each conversion twice. The state is taken
    whole (attempts, trace id, Meta's count); the events' statuses and the counts follow.
    None if the replaced store cannot be read (a damaged one, kept aside as its bytes)."""
    conn = sqlite3.connect(f"file:{quote(str(restored))}", uri=True, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("ATTACH DATABASE ? AS replaced", (f"file:{quote(str(replaced))}?mode=ro",))
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = conn.execute(_DELIVERED_SINCE).fetchall()
            conn.executemany(_TAKE_OVER, [(*row[2:], row[0], row[1]) for row in rows])
            conn.executemany(UPDATE_EVENT_STATUS, [(pk, pk) for pk in {row[0] for row in rows}])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.DatabaseError:
        return None  # not a store (a restore onto a damaged file): nothing to compare
    finally:
        conn.close()
    carried: dict[str, int] = {}
    for _, sink, *_ in rows:
        carried[sink] = carried.get(sink, 0) + 1
    return carried


# Pending here, delivered there: the same event (account and eventId), the same sink.
_DELIVERED_SINCE = (
    "SELECT d.event_pk, d.sink, r.status, r.attempts, r.payload, r.error, r.error_code,"
    " r.trace_id, r.events_received, r.warnings, r.updated_at"
    " FROM main.deliveries d JOIN main.events e ON e.pk = d.event_pk"
    " JOIN replaced.events re ON re.account_id = e.account_id AND re.event_id = e.event_id"
    " JOIN replaced.deliveries r ON r.event_pk = re.pk AND r.sink = d.sink"
    " WHERE d.status = 'pending' AND r.status = 'delivered'"
)
_TAKE_OVER = (
    "UPDATE main.deliveries SET status = ?, attempts = ?, payload = ?, error = ?,"
    " error_code = ?, trace_id = ?, events_received = ?, warnings = ?, updated_at = ?,"
    " next_attempt_at = NULL, claimed_by = NULL, claim_until = NULL"
    " WHERE event_pk = ? AND sink = ?"
)


def _read_one(path: Path, sql: str) -> Any:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def store_stats(store: Path) -> list[dict[str, Any]]:
    """Rows, bytes and the age of the oldest row, per table."""
    if not store.exists():
        raise ConfigError(f"no store at {store}: check [store] path")
    _check_readable(store)
    conn = _connect(store)
    try:
        conn.execute("PRAGMA query_only = ON")
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        try:
            sizes = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"))
        except sqlite3.OperationalError:
            sizes = {}  # SQLite built without the dbstat table
        now = time.time()
        found = []
        for table in tables:
            # Table names come from sqlite_master, not from anyone's input.
            (rows,) = conn.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()
            oldest = None
            if table in _OLDEST and rows:
                (first,) = conn.execute(f'SELECT MIN({_OLDEST[table]}) FROM "{table}"').fetchone()
                oldest = None if first is None else round((now - first) / 86400, 1)
            found.append(
                {"table": table, "rows": rows, "bytes": sizes.get(table), "oldestDays": oldest}
            )
        return found
    finally:
        conn.close()
