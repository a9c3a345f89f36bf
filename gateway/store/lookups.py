"""The conversation lookups a conversion makes, remembered and kept exact by the writers.

A conversion finds its conversation by phone, BSUID or id: one point read per request, and on
a busy store the read is never warm (each commit makes SQLite drop the reading connection's
page cache). :class:`LookupCache` keeps the answers, and forgets them the moment they could
be wrong:

- **in this process**, every committed write that touches conversations names what it
  touched (:data:`Touched`: conversation ids, phones and BSUIDs per account); the entries that
  depend on any of them are dropped on the event loop before the write's caller hears back,
  so nothing that happens after a capture can see the conversation as it was before it. A
  write that touches too much to name (retention, an erasure) drops everything;
- **in other processes on the same store** (a second ``serve``, ``ctwa-gateway send``,
  ``webhooks reprocess``): each such write also moves a counter in a small shared file,
  ``<store>.changes``, after its commit and before its caller hears back; a lookup reads the
  counter first (a memory read of a mapped page) and drops everything when another process
  moved it;
- **as a last net**, an entry lives at most ``ttl_s`` (a process killed between its commit
  and moving the counter, or the database edited by hand).

On PostgreSQL nothing is remembered (``enabled=False``): replicas on other machines share no
file, and a notice from another replica would arrive after a request that needed it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["EVERYTHING", "ChangeSignal", "LookupCache", "Touched", "tags_of"]

# What a write touched: ("id", conversation id) or (kind, account, value) with kind "phone" or
# "bsuid"; EVERYTHING when it cannot say.
Touched = frozenset[tuple[str, ...]]
EVERYTHING: Touched = frozenset({("*",)})

_COUNTER = struct.Struct("<Q")


def tags_of(
    account_id: str,
    *,
    conversation_id: str | None = None,
    phones: Iterable[str | None] = (),
    bsuids: Iterable[str | None] = (),
) -> set[tuple[str, ...]]:
    """The tags of a conversation's identifiers (None values are skipped)."""
    tags: set[tuple[str, ...]] = set()
    if conversation_id is not None:
        tags.add(("id", conversation_id))
    tags.update(("phone", account_id, p) for p in phones if p)
    tags.update(("bsuid", account_id, b) for b in bsuids if b)
    return tags


class ChangeSignal:
    """A counter in a file every process of one store maps: who moved it last, and when."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < _COUNTER.size:
                os.ftruncate(fd, _COUNTER.size)
            self._map = mmap.mmap(fd, _COUNTER.size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # The last value this process knows about: written by it, or seen and acted on.
        self.known = self.read()

    def read(self) -> int:
        value: int = _COUNTER.unpack_from(self._map)[0]
        return value

    def move(self) -> bool:
        """Move the counter one step; return whether another process had moved it first."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            value = self.read()
            _COUNTER.pack_into(self._map, 0, value + 1)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        moved_by_others = value != self.known
        self.known = value + 1
        return moved_by_others

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class LookupCache:
    """Answers of point lookups by key, each with the tags whose change invalidates it."""

    def __init__(
        self,
        signal: ChangeSignal | None,
        *,
        ttl_s: float = 30.0,
        max_entries: int = 100_000,
        enabled: bool = True,
    ) -> None:
        self.signal = signal
        self.enabled = enabled
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: dict[Hashable, tuple[float, Any]] = {}
        self._by_tag: dict[tuple[str, ...], set[Hashable]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> tuple[bool, Any]:
        """Return (True, answer) if ``key`` is known and still exact, else (False, None)."""
        if not self.enabled:
            return False, None
        signal = self.signal
        if signal is not None and signal.read() != signal.known:
            self.clear()
            signal.known = signal.read()
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            self.misses += 1
            return False, None
        self.hits += 1
        return True, entry[1]

    def put(self, key: Hashable, answer: Any, tags: Iterable[tuple[str, ...]]) -> None:
        """Remember ``answer``; it is dropped when any of ``tags`` is touched."""
        if not self.enabled:
            return
        # Both maps are bounded: an answer dropped through one of its tags stays listed under
        # its others until those are touched, so the tag map can outgrow the answers.
        if len(self._entries) >= self._max_entries or len(self._by_tag) >= 4 * self._max_entries:
            self.clear()
        self._entries[key] = (time.monotonic() + self._ttl_s, answer)
        for tag in tags:
            self._by_tag.setdefault(tag, set()).add(key)

    def touched(self, tags: Touched) -> None:
        """A write of this process committed: drop what it may have changed, and tell the
        other processes (they drop everything)."""
        if self.signal is not None and self.signal.move():
            tags = EVERYTHING  # another process wrote too, and this one had not seen it
        if tags is EVERYTHING or ("*",) in tags:
            self.clear()
            return
        for tag in tags:
            for key in self._by_tag.pop(tag, ()):
                self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
        self._by_tag.clear()
