"""File locks beside the store: who serves it.

``flock`` locks belong to the open file and the kernel drops them when the process ends, crash
included, so a lock is never left behind. A serving gateway holds ``<store>.lock`` shared
(several may serve one store); ``restore`` needs it exclusive. (Who delivers what is settled by
claims in the store itself: :mod:`gateway.store.outbox`.)
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["FileLock", "serving_lock"]


class FileLock:
    """A non-blocking ``flock``, shared or exclusive, held until released or the process ends."""

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock if nobody holds it in a conflicting way; return whether we hold it."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def serving_lock(store: Path, *, shared: bool) -> FileLock:
    """The lock a serving gateway holds shared, and ``restore`` exclusive."""
    return FileLock(Path(f"{store}.lock"), shared=shared)
