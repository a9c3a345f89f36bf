"""ctwa-gateway: capture Click-to-WhatsApp click ids and report conversions to Meta.

This module is the API for plugin authors: the ``hookimpl`` marker and the types hooks see.
The hooks themselves are documented in :mod:`gateway.hookspecs`.
"""

from gateway.config import AccountConfig, Settings
from gateway.domain import Conversation, PreparedEvent, Resolved, SinkState, StoredEvent
from gateway.draft import EventDraft
from gateway.errors import (
    ConfigError,
    GatewayError,
    InvalidRequest,
    NotFound,
    Unprocessable,
)
from gateway.hookspecs import hookimpl
from gateway.phones import PhoneForms, invalid_phone, parse_phone
from gateway.store.database import Store
from gateway.wire import ConversionRequest

__all__ = [
    "AccountConfig",
    "ConfigError",
    "Conversation",
    "ConversionRequest",
    "EventDraft",
    "GatewayError",
    "InvalidRequest",
    "NotFound",
    "PhoneForms",
    "PreparedEvent",
    "Resolved",
    "Settings",
    "SinkState",
    "Store",
    "StoredEvent",
    "Unprocessable",
    "hookimpl",
    "invalid_phone",
    "parse_phone",
]
