"""A PostgreSQL server for tests, and a fresh empty database on it for each test.

The server is ``CTWA_TEST_POSTGRES_URL`` when set (its role must be allowed to create
databases), or else a throwaway cluster this module starts from the binaries the ``pgserver``
wheel ships: PostgreSQL 16, nothing to download or install, up in about a second.

The cluster is started here rather than through ``pgserver.get_server``: as root (CI, the dev
machines) that adds a system user with ``useradd`` and opens up the permissions of every folder
above its data directory and its binaries; it also fsyncs its ``initdb`` and stops the server
only at exit. PostgreSQL refuses to run as root, so as root the cluster runs as ``nobody``: an
unprivileged account every Linux has, given only the cluster's own temporary folder.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

__all__ = [
    "SERVER_URL_VARIABLE",
    "PostgresCluster",
    "PostgresUnavailable",
    "create_database",
    "database_url",
    "drop_database",
    "sessions_waiting_on_locks",
]

SERVER_URL_VARIABLE = "CTWA_TEST_POSTGRES_URL"

# As root, the account the cluster runs as (PostgreSQL will not run as root).
_UNPRIVILEGED_USER = "nobody"
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
# A Unix socket's path must fit in sun_path (108 bytes on Linux, with its NUL).
_SOCKET_PATH_MAX = 107


class PostgresUnavailable(RuntimeError):
    """The test PostgreSQL could not be started; the message says why."""


def _binaries() -> Path:
    """Return the folder of the PostgreSQL binaries inside the installed pgserver wheel."""
    # find_spec locates the package without importing it: importing pgserver computes a
    # runtime folder, and warns about XDG_RUNTIME_DIR where none is set.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresUnavailable(
            f"pgserver is not installed (pip install -e '.[test]'), and {SERVER_URL_VARIABLE}"
            " is not set"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise PostgresUnavailable(f"the pgserver wheel has no PostgreSQL binaries in {bin_dir}")
    return bin_dir


def _run_as() -> dict[str, Any]:
    """Return the subprocess arguments that drop root to the unprivileged account."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam(_UNPRIVILEGED_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, and there is no {_UNPRIVILEGED_USER!r} account to run"
            " PostgreSQL as (it refuses to run as root)"
        ) from None
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _reachable_by_others(bin_dir: Path) -> bool:
    """Whether an account other than the owner can run the binaries in ``bin_dir``."""
    folders = [bin_dir.resolve(), *bin_dir.resolve().parents]
    return all(folder.stat().st_mode & 0o001 for folder in folders) and bool(
        (bin_dir / "postgres").stat().st_mode & 0o001
    )


def _copy_binaries(bin_dir: Path, into: Path) -> Path:
    """Copy the wheel's PostgreSQL and its bundled libraries into ``into``, keeping the layout
    their run path expects (``$ORIGIN/../../../pgserver.libs``); return the new bin folder."""
    package = bin_dir.parent.parent
    shutil.copytree(package / "pginstall", into / "pgserver" / "pginstall", symlinks=True)
    shutil.copytree(package.parent / "pgserver.libs", into / "pgserver.libs", symlinks=True)
    return into / "pgserver" / "pginstall" / "bin"


@dataclass
class PostgresCluster:
    """A PostgreSQL server started in a temporary folder, listening on a Unix socket only."""

    root: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        """Return the URL of the cluster's ``postgres`` database, as the superuser."""
        return f"postgresql://postgres@/postgres?host={self.root}"

    @classmethod
    def start(cls, *, durable: bool = False) -> PostgresCluster:
        """Create a cluster in a new temporary folder and start it; fail with the reason.
        ``durable``: fsync and synchronous commit on, as in production (the benches); the
        tests leave them off."""
        bin_dir = _binaries()
        run_as = _run_as()
        root = Path(tempfile.mkdtemp(prefix="ctwa-pg-"))
        try:
            if len(str(root / ".s.PGSQL.5432")) > _SOCKET_PATH_MAX:
                raise PostgresUnavailable(f"{root} is too long a path for a Unix socket")
            if run_as:
                os.chown(root, run_as["user"], run_as["group"])
                if not _reachable_by_others(bin_dir):
                    # A checkout under a private folder (/root): the unprivileged account
                    # could not run the wheel's binaries where they are.
                    bin_dir = _copy_binaries(bin_dir, root / "wheel")
            process = _start(bin_dir, root, run_as, durable=durable)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return cls(root=root, process=process)

    def stop(self) -> None:
        """Stop the server, disconnecting any client left, and delete its folder."""
        try:
            if self.process.poll() is None:
                # SIGINT is the fast shutdown: SIGTERM would wait for every client to leave.
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _start(
    bin_dir: Path, root: Path, run_as: dict[str, Any], *, durable: bool
) -> subprocess.Popen[bytes]:
    data = root / "data"
    log_path = root / "postgres.log"
    initdb = subprocess.run(
        [
            bin_dir / "initdb",
            "--pgdata",
            data,
            "--username=postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            # A throwaway cluster: nothing is worth an fsync.
            "--no-sync",
        ],
        cwd=root,
        capture_output=True,
        check=False,
        **run_as,
    )
    if initdb.returncode != 0:
        hint = f" (it runs as {_UNPRIVILEGED_USER!r}, who must reach {root})" if run_as else ""
        raise PostgresUnavailable(
            f"initdb failed ({initdb.returncode}){hint}:\n" + initdb.stderr.decode(errors="replace")
        )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                bin_dir / "postgres",
                "-D",
                data,
                # The socket in our own folder, and no TCP port: nothing to collide with.
                "-k",
                root,
                "-h",
                "",
                "-c",
                "max_connections=200",
                # Durability is no concern in tests; speed is.
                *(() if durable else _FAST),
            ],
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            **run_as,
        )
    deadline = time.monotonic() + _START_TIMEOUT_S
    pid_file = data / "postmaster.pid"
    while True:
        if process.poll() is not None:
            raise PostgresUnavailable(
                f"postgres exited with {process.returncode}:\n"
                + log_path.read_text(errors="replace")
            )
        # The postmaster writes "ready" as the pid file's last line once it accepts clients.
        if pid_file.exists() and pid_file.read_text().rstrip().endswith("ready"):
            return process
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise PostgresUnavailable(
                f"postgres was not ready after {_START_TIMEOUT_S:.0f} s:\n"
                + log_path.read_text(errors="replace")
            )
        time.sleep(0.02)


_FAST = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")


def database_url(server_url: str, name: str) -> str:
    """Return ``server_url`` with its database replaced by ``name``."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def create_database(server_url: str) -> str:
    """Create an empty database on the server; return its name."""
    # Lower-case letters, digits and underscores only: no quoting needed.
    name = f"ctwa_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    return name


async def drop_database(server_url: str, name: str) -> None:
    """Drop a database :func:`create_database` made, even with clients still connected."""
    admin = await asyncpg.connect(server_url)
    try:
        # FORCE: a connection the test left open must not keep the database alive.
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


async def sessions_waiting_on_locks(
    pg_url: str,
    count: int = 1,
    *,
    watching: tuple[asyncio.Future[Any], ...] = (),
    finishing_is_enough: bool = False,
) -> None:
    """Wait until ``count`` sessions of this database wait for a lock. One of ``watching``
    that finishes first ends the wait too when ``finishing_is_enough`` (a statement that may
    skip the lock rather than wait), and is an error otherwise (the race was never set up)."""
    # Another connection: a session's view of pg_stat_activity holds still in a transaction.
    watch = await asyncpg.connect(pg_url)
    try:
        for _ in range(1000):
            waiting = await watch.fetchval(
                "SELECT COUNT(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting >= count:
                return
            for fut in watching:
                if fut.done():
                    if finishing_is_enough:
                        return
                    raise AssertionError(f"finished without waiting: {fut.result()!r}")
            await asyncio.sleep(0.01)
        raise AssertionError(f"{count} sessions never waited for a lock")
    finally:
        await watch.close()
