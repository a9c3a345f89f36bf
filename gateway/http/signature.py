"""Webhook secrets and Meta's ``X-Hub-Signature-256`` (HMAC-SHA256 of the exact body bytes)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config import WebhookConfig

__all__ = ["WebhookSecrets", "sign", "signature_matches"]

_PREFIX = "sha256="


def sign(app_secret: bytes, body: bytes) -> str:
    """Return the header value Meta sends for ``body``."""
    return _PREFIX + hmac.new(app_secret, body, hashlib.sha256).hexdigest()


def signature_matches(app_secret: bytes, body: bytes, header: str | None) -> bool:
    """Tell whether ``header`` signs exactly these bytes, comparing in constant time."""
    if not header or not header.startswith(_PREFIX):
        return False
    # Meta sends lowercase hex; compare as bytes so non-ASCII input cannot raise.
    return hmac.compare_digest(
        sign(app_secret, body).encode(), header.strip().lower().encode("utf-8", "replace")
    )


@dataclass(frozen=True)
class WebhookSecrets:
    """The verify token and app secret, read from the variables ``[webhook]`` names."""

    verify_token: bytes | None
    app_secret: bytes | None

    @classmethod
    def from_config(cls, config: WebhookConfig, environ: Mapping[str, str]) -> WebhookSecrets:
        def read(name: str | None) -> bytes | None:
            # Without the newline a secret mounted from a file often ends with, as the
            # [secrets] file's values and the access tokens are read.
            value = environ.get(name, "").strip() if name else ""
            return value.encode() if value else None

        return cls(read(config.verify_token_env), read(config.app_secret_env))

    def token_matches(self, presented: str) -> bool:
        """Tell whether the handshake's ``hub.verify_token`` is ours (constant time)."""
        if self.verify_token is None:
            return False
        return hmac.compare_digest(self.verify_token, presented.encode("utf-8", "replace"))
