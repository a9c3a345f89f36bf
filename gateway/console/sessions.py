"""Console sessions: a random id in the browser, what it stands for in the process's memory.

The id is 32 random bytes; the table is keyed by its SHA-256, so a lookup does not compare
secrets byte by byte. A session remembers the digest of the API key it signed in with (never
the key), its CSRF token and when it ends. Sessions end on sign-out, at ``session_ttl_s``
after sign-in, when their key is no longer configured, or (the oldest first) past
``max_sessions``; a restart ends them all.
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
        self, *, ttl_s: float, max_sessions: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.ttl_s = ttl_s
        self._max = max_sessions
        self.clock = clock
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    def start(self, key_digest: bytes) -> str:
        """Open a session for a key; return its id (for the cookie, and nowhere else)."""
        self._expire()
        session_id = secrets.token_urlsafe(32)
        self._sessions[_slot(session_id)] = Session(
            key_digest=key_digest,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=self.clock() + self.ttl_s,
        )
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return session_id

    def get(self, session_id: str) -> Session | None:
        """Return the live session with this id, or None (unknown, ended or expired)."""
        slot = _slot(session_id)
        session = self._sessions.get(slot)
        if session is not None and session.expires_at <= self.clock():
            del self._sessions[slot]
            return None
        return session

    def end(self, session_id: str) -> None:
        """End a session (sign-out); an unknown id is ignored."""
        self._sessions.pop(_slot(session_id), None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        # Oldest first: sessions are appended in creation order and all live equally long.
        now = self.clock()
        while self._sessions:
            slot, session = next(iter(self._sessions.items()))
            if session.expires_at > now:
                break
            del self._sessions[slot]
