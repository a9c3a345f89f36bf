"""Console sessions: a random id in the browser, what it stands for in the process's memory.

The id is 32 random bytes; the table is keyed by its SHA-256, so a lookup does not compare
secrets byte by byte. A session remembers the digest of the API key it signed in with (never
the key), its CSRF token and when it ends. Sessions end on sign-out, at ``session_ttl_s``
after sign-in, when their key is no longer configured, when the browser signs in again, or
when there are too many: past ``max_sessions_per_key`` a key's own oldest session ends, and
past ``max_sessions`` the oldest of the key holding the most, so whoever holds one key cannot
end the sessions of another by signing in again and again. A restart ends them all.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Session", "Sessions"]


@dataclass(frozen=True)
class Session:
    """One signed-in browser."""

    key_digest: bytes
    csrf_token: str
    expires_at: float


def _slot(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).digest()


class Sessions:
    """The signed-in browsers of this process."""

    def __init__(
        self,
        *,
        ttl_s: float,
        max_sessions: int,
        max_per_key: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl_s = ttl_s
        self._max = max_sessions
        self._max_per_key = max_sessions if max_per_key is None else max_per_key
        self.clock = clock
        # Both in creation order, which is also expiry order (every session lives as long).
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self._by_key: dict[bytes, OrderedDict[bytes, None]] = {}

    def start(self, key_digest: bytes) -> str:
        """Open a session for a key; return its id (for the cookie, and nowhere else)."""
        self._expire()
        session_id = secrets.token_urlsafe(32)
        slot = _slot(session_id)
        self._sessions[slot] = Session(
            key_digest=key_digest,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=self.clock() + self.ttl_s,
        )
        mine = self._by_key.setdefault(key_digest, OrderedDict())
        mine[slot] = None
        if len(mine) > self._max_per_key:
            self._drop(next(iter(mine)))
        while len(self._sessions) > self._max:
            # The key with the most sessions gives up its oldest: a few keys, so a short scan.
            busiest = max(self._by_key.values(), key=len)
            self._drop(next(iter(busiest)))
        return session_id

    def get(self, session_id: str) -> Session | None:
        """Return the live session with this id, or None (unknown, ended or expired)."""
        slot = _slot(session_id)
        session = self._sessions.get(slot)
        if session is not None and session.expires_at <= self.clock():
            self._drop(slot)
            return None
        return session

    def end(self, session_id: str) -> None:
        """End a session (sign-out); an unknown id is ignored."""
        self._drop(_slot(session_id))

    def __len__(self) -> int:
        return len(self._sessions)

    def _drop(self, slot: bytes) -> None:
        session = self._sessions.pop(slot, None)
        if session is None:
            return
        mine = self._by_key[session.key_digest]
        del mine[slot]
        if not mine:
            del self._by_key[session.key_digest]

    def _expire(self) -> None:
        now = self.clock()
        while self._sessions:
            slot, session = next(iter(self._sessions.items()))
            if session.expires_at > now:
                break
            self._drop(slot)
