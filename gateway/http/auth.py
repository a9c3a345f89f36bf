"""API keys: read from the environment variables config names, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gateway.config import AuthConfig
from gateway.errors import ConfigError, Forbidden, RateLimited, Unauthorized

__all__ = [
    "ApiKey",
    "FailureLimiter",
    "IPNetwork",
    "KeyRing",
    "client_address",
    "secret_matches",
    "trusted_peer",
]


@dataclass(frozen=True)
class ApiKey:
    """A configured key, by name; the secret itself is kept only as a digest."""

    name: str
    accounts: frozenset[str]
    rate_per_s: float | None = None
    burst: int | None = None

    def allows(self, account_id: str) -> bool:
        return "*" in self.accounts or account_id in self.accounts


class KeyRing:
    """Maps presented bearer tokens to configured keys, and meters each key's rate."""

    def __init__(
        self, keys: Mapping[bytes, ApiKey], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._keys = dict(keys)
        # Tokens that matched a key, as presented: the next request with one is a dict
        # lookup, not a SHA-256 and a loop of comparisons (a sixth of a request's own work).
        # Only exact matches of configured secrets land here, so it holds at most one entry
        # per key, and a wrong token is compared by its digest as before: the lookup hashes
        # it with the process's secret hash key, and only an equal hash is ever compared.
        self._matched: dict[str, ApiKey] = {}
        self._clock = clock
        # Token buckets: key name -> (tokens left, when last refilled).
        self._buckets: dict[str, tuple[float, float]] = {}
        self.on_limited: Callable[[ApiKey], None] | None = None

    @classmethod
    def from_config(cls, auth: AuthConfig, environ: Mapping[str, str]) -> KeyRing:
        """Read every key's secret from its environment variable; a missing one is an error."""
        keys: dict[bytes, ApiKey] = {}
        for i, key in enumerate(auth.keys):
            secret = environ.get(key.key_env, "")
            if not secret:
                raise ConfigError(
                    f"API key {key.name!r}: environment variable {key.key_env} is not set"
                    f" (named at `$.auth.keys[{i}].key_env`)"
                )
            if len(secret) < 16:
                raise ConfigError(
                    f"API key {key.name!r}: the value of {key.key_env} is shorter than 16"
                    " characters; use a long random key (e.g. `openssl rand -hex 24`)"
                )
            keys[_digest(secret)] = ApiKey(
                name=key.name,
                accounts=frozenset(key.accounts),
                rate_per_s=key.rate_per_s,
                burst=key.burst or (max(1, int(key.rate_per_s)) if key.rate_per_s else None),
            )
        return cls(keys)

    def fingerprint(self) -> frozenset[tuple[bytes, ApiKey]]:
        """Return what identifies this ring's keys (digests, never the keys)."""
        return frozenset(self._keys.items())

    def authenticate(self, authorization: str | None) -> ApiKey:
        """Return the key for an ``Authorization: Bearer`` header, or raise 401."""
        if not authorization:
            raise Unauthorized(
                "Unauthorized: send `Authorization: Bearer <api key>`.", code="missing_api_key"
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "Unauthorized: the Authorization header must be `Bearer <api key>`.",
                code="invalid_authorization",
            )
        key = self._matched.get(token)
        if key is None:
            key = self._by_digest(_digest(token))
            if key is None:
                raise Unauthorized("Unauthorized: unknown API key.", code="invalid_api_key")
            self._matched[token] = key
        self._meter(key)
        return key

    def _by_digest(self, digest: bytes) -> ApiKey | None:
        # Compare digests so the time taken does not depend on how much of a key matched.
        for known, key in self._keys.items():
            if hmac.compare_digest(known, digest):
                return key
        return None

    def sign_in(self, presented: str) -> tuple[ApiKey, bytes]:
        """Return the key a console sign-in presents and its digest (what the session
        keeps: never the key), or raise 401 like a request with that key."""
        key = self.authenticate(f"Bearer {presented}")
        return key, _digest(presented.strip())

    def by_digest(self, digest: bytes) -> ApiKey | None:
        """Return the key a console session signed in with, metered like a request with
        it; None once it is no longer configured (revoked or rotated on SIGHUP)."""
        key = self._by_digest(digest)
        if key is not None:
            self._meter(key)
        return key

    def _meter(self, key: ApiKey) -> None:
        """Take one token from the key's bucket, or raise 429 saying when to come back."""
        if key.rate_per_s is None or key.burst is None:
            return
        now = self._clock()
        tokens, last = self._buckets.get(key.name, (float(key.burst), now))
        tokens = min(float(key.burst), tokens + (now - last) * key.rate_per_s)
        if tokens < 1.0:
            self._buckets[key.name] = (tokens, now)
            wait = (1.0 - tokens) / key.rate_per_s
            if self.on_limited is not None:
                self.on_limited(key)
            error = RateLimited(
                f"Rate limit: API key {key.name!r} may send {key.rate_per_s:g} requests per"
                f" second (bursts of {key.burst}); retry after {wait:.2f} s.",
                details={"retryAfterSeconds": round(wait, 3)},
            )
            error.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            raise error
        self._buckets[key.name] = (tokens - 1.0, now)

    @staticmethod
    def authorize(key: ApiKey, account_id: str) -> None:
        """Raise 403 unless ``key`` may act for ``account_id``."""
        if not key.allows(account_id):
            raise Forbidden(
                f"API key {key.name!r} may not act for account {account_id!r}; use a key whose"
                " `accounts` list includes it.",
                code="account_not_allowed",
                param="accountId",
            )


def _digest(secret: str) -> bytes:
    # surrogateescape: a header with bytes that are not UTF-8 hashes too (and matches nothing)
    # instead of raising.
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def secret_matches(presented: str, secret: str) -> bool:
    """Compare a presented secret with the expected one in constant time, whatever its bytes."""
    return hmac.compare_digest(_digest(presented), _digest(secret))


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class FailureLimiter:
    """Failed authentications per client address: a token bucket each, refilled over time.

    Every request is judged on its credentials; past its budget, an address's failures are
    answered 429 instead of 401, so valid keys and signatures from the same address (a NAT, a
    proxy not declared trusted) keep working: nobody can be locked out by someone else.
    """

    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._max_clients = max_clients
        # Address -> (tokens left, when last refilled, limited since it last had a full
        # bucket); oldest first, so the map stays bounded.
        self._buckets: OrderedDict[str, tuple[float, float, bool]] = OrderedDict()

    def failed(self, client: str) -> tuple[float | None, bool]:
        """Count a failure of ``client``; return how long it must wait before its next failure
        is answered 401 again (None: within its budget, answer 401 now), and whether the
        budget was just used up (log it once, not at every failure after)."""
        now = self._clock()
        tokens, last, limited = self._buckets.get(client, (float(self.burst), now, False))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate_per_s)
        if tokens >= self.burst:
            limited = False  # a full bucket: a new episode
        newly = False
        wait: float | None = None
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate_per_s
            newly, limited = not limited, True
        self._buckets[client] = (tokens, now, limited)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait, newly


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]
) -> str:
    """Return the client's address: the peer, or, from a trusted proxy, the last address in
    X-Forwarded-For that is not a trusted proxy itself. IPv6 clients count per /64 (one
    host has a whole /64 to pick addresses from)."""
    address = peer or "unknown"
    if forwarded_for is not None and _within(address, trusted):
        for hop in reversed(forwarded_for.split(",")):
            hop = hop.strip()
            if not _within(hop, trusted):
                address = hop[:64] or address
                break
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def trusted_peer(peer: str | None, trusted: Sequence[IPNetwork]) -> bool:
    """Tell whether the peer is a trusted proxy, whose X-Forwarded-* headers are believed."""
    return peer is not None and _within(peer, trusted)


def _within(address: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)
