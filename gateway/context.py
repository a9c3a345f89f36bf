"""The typed ``web.AppKey``s through which handlers reach the app's shared objects."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import KeyRing
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.plugin_manager import Plugins
from gateway.signature import WebhookSecrets

__all__ = ["KEYS", "METRICS", "METRICS_KEY", "PIPELINE", "PLUGINS", "SETTINGS", "WEBHOOK_SECRETS"]

SETTINGS = web.AppKey("settings", Settings)
PLUGINS = web.AppKey("plugins", Plugins)
KEYS = web.AppKey("keys", KeyRing)
WEBHOOK_SECRETS = web.AppKey("webhook_secrets", WebhookSecrets)
METRICS = web.AppKey("metrics", Metrics)
# The bearer key /metrics requires; "" when it is open.
METRICS_KEY = web.AppKey("metrics_key", str)
# Set by the store's cleanup context: it exists only while the store is open.
PIPELINE = web.AppKey("pipeline", Pipeline)
