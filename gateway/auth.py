"""API keys: read from the environment variables config names, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config import AuthConfig
from gateway.errors import ConfigError, Forbidden, Unauthorized

__all__ = ["ApiKey", "KeyRing"]


@dataclass(frozen=True)
class ApiKey:
    """A configured key, by name; the secret itself is kept only as a digest."""

    name: str
    accounts: frozenset[str]

    def allows(self, account_id: str) -> bool:
        return "*" in self.accounts or account_id in self.accounts


class KeyRing:
    """Maps presented bearer tokens to configured keys."""

    def __init__(self, keys: Mapping[bytes, ApiKey]) -> None:
        self._keys = dict(keys)

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
            keys[_digest(secret)] = ApiKey(name=key.name, accounts=frozenset(key.accounts))
        return cls(keys)

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
        digest = _digest(token)
        # Compare digests so the time taken does not depend on how much of a key matched.
        for known, key in self._keys.items():
            if hmac.compare_digest(known, digest):
                return key
        raise Unauthorized("Unauthorized: unknown API key.", code="invalid_api_key")

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
    return hashlib.sha256(secret.encode("utf-8")).digest()
