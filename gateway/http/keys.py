"""The typed ``web.AppKey``s through which handlers reach the app's shared objects."""

from __future__ import annotations

from aiohttp import web

from gateway.config import Settings
from gateway.credentials import Credentials
from gateway.http.body import BodyBudget
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.plugin_manager import Plugins

__all__ = ["CREDENTIALS", "METRICS", "PIPELINE", "PLUGINS", "SETTINGS", "WEBHOOK_BODIES"]

SETTINGS = web.AppKey("settings", Settings)
PLUGINS = web.AppKey("plugins", Plugins)
# API keys, webhook secrets and the metrics key: one object, its fields swapped on SIGHUP.
CREDENTIALS = web.AppKey("credentials", Credentials)
METRICS = web.AppKey("metrics", Metrics)
# Set by the store's cleanup context: it exists only while the store is open.
PIPELINE = web.AppKey("pipeline", Pipeline)
# The bytes of webhook bodies being received, before their signature can be checked.
WEBHOOK_BODIES = web.AppKey("webhook_bodies", BodyBudget)
