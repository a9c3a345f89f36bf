"""The secrets requests are checked against, where they come from, and reloading them on SIGHUP.

Secrets live in environment variables that ``config.toml`` names. A process's environment
cannot change once it runs, so ``[secrets] file`` may name an env file (``NAME=value`` lines,
e.g. a systemd ``EnvironmentFile``) whose values override the environment; it is read at start
and again on ``SIGHUP``. A reload that would not pass startup's own checks is refused and the
running secrets are kept.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.http.auth import KeyRing
from gateway.http.signature import WebhookSecrets

__all__ = ["Credentials", "load_environ", "metrics_key", "read_env_file"]

log = structlog.get_logger()


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``NAME=value`` lines (``export`` and matching quotes allowed; ``#`` comments)."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"[secrets] file {path}: cannot read it ({exc})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secrets_file_not_private", path=str(path), fix=f"chmod 600 {path}")
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name.isidentifier():
            # The line number only: the line itself may hold a secret.
            raise ConfigError(f"[secrets] file {path}: line {number} is not NAME=value")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values


def load_environ(settings: Settings, base: Mapping[str, str]) -> dict[str, str]:
    """Return the environment secrets are read from: ``base`` and the ``[secrets] file``."""
    environ = dict(base)
    path = settings.secrets_file()
    if path is not None:
        environ.update(read_env_file(path))
    return environ


def metrics_key(settings: Settings, environ: Mapping[str, str]) -> str:
    """Return the key /metrics requires ("" when open); a named but unset variable is an error."""
    name = settings.metrics.key_env
    if name is None:
        server = settings.server
        # Behind a proxy (trusted_proxies), loopback is the proxy: the world reaches it.
        if not settings.metrics.public and (server.trusted_proxies or not server.is_loopback()):
            where = "through your proxy" if server.trusted_proxies else f"on {server.host}"
            raise ConfigError(
                f"/metrics would be open to anyone {where} (it shows accounts and key names):"
                " set [metrics] key_env to a variable holding a key, or public = true if that"
                " is what you want"
            )
        return ""
    value = environ.get(name, "")
    if not value:
        raise ConfigError(f"[metrics] key_env names {name}, which is not set")
    return value


@dataclass
class Credentials:
    """API keys, the webhook's secrets and the metrics key, replaced together on reload."""

    keys: KeyRing
    webhook: WebhookSecrets
    metrics_key: str

    @classmethod
    def load(cls, settings: Settings, environ: Mapping[str, str]) -> Credentials:
        """Read every secret; raises ConfigError naming the first that is missing or weak."""
        return cls(
            keys=KeyRing.from_config(settings.auth, environ),
            webhook=WebhookSecrets.from_config(settings.webhook, environ),
            metrics_key=metrics_key(settings, environ),
        )

    def replace_with(self, new: Credentials) -> list[str]:
        """Take ``new``'s secrets (keeping the rate-limit hook); return what changed."""
        changed = []
        if new.keys.fingerprint() != self.keys.fingerprint():
            changed.append("api_keys")
        if new.webhook != self.webhook:
            changed.append("webhook")
        if new.metrics_key != self.metrics_key:
            changed.append("metrics_key")
        new.keys.on_limited = self.keys.on_limited
        self.keys, self.webhook, self.metrics_key = new.keys, new.webhook, new.metrics_key

        return changed
