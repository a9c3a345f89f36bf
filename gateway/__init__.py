"""ctwa-gateway: capture Click-to-WhatsApp click ids and report conversions to Meta.

This module is the whole API for plugin authors; everything else in ``gateway`` is internal
and may change. The built-in plugins in ``plugins/`` import only from here, so an integrator
could have written any of them. The hooks themselves are documented in
:mod:`gateway.hookspecs`.

- the marker: :data:`hookimpl`;
- the records hooks see and return: :class:`ConversionRequest` (the request as sent),
  :class:`Conversation`, :class:`Resolved`, :class:`EventDraft`, :class:`PreparedEvent`,
  :class:`StoredEvent`, :class:`SinkState`, :class:`QueuedEvent`, :class:`SendOutcome`,
  :class:`DeliveryOptions`, :class:`PhoneMatch`, and the configuration
  (:class:`Settings`, :class:`AccountConfig`);
- :class:`Store`, the protocol of what plugins may ask of the store;
- Meta's hashing rules (:func:`hash_email`, :func:`hash_phone`, :func:`hash_external_id`,
  :func:`sha256_hex`, :func:`is_sha256_hex`) and phone parsing (:func:`parse_phone`);
- the errors that become Zernio-shaped answers (:class:`InvalidRequest` 400,
  :class:`NotFound` 404, :class:`Unprocessable` 422, :class:`PlatformError` 502) and
  :class:`ConfigError`, which stops startup with one line;
- for plugin routes: :func:`authorized_account`, :func:`query_account_id`,
  :func:`read_json`, :func:`json_response`, and the dataset endpoints' wire shapes.
"""

from gateway.config import AccountConfig, Settings
from gateway.domain import (
    Conversation,
    DeliveryOptions,
    PhoneMatch,
    PreparedEvent,
    QueuedEvent,
    Resolved,
    SendOutcome,
    SinkState,
    StoredEvent,
)
from gateway.draft import EventDraft
from gateway.errors import (
    ConfigError,
    GatewayError,
    InvalidRequest,
    NotFound,
    PlatformError,
    Unprocessable,
)
from gateway.hashing import hash_email, hash_external_id, hash_phone, is_sha256_hex, sha256_hex
from gateway.hookspecs import hookimpl
from gateway.http.handlers import authorized_account, json_response, query_account_id, read_json
from gateway.metrics import Metrics
from gateway.phones import PhoneForms, invalid_phone, parse_phone
from gateway.store.protocol import Store
from gateway.wire import ConversionRequest, DatasetAnswer, DatasetRequest

__all__ = [
    "AccountConfig",
    "ConfigError",
    "Conversation",
    "ConversionRequest",
    "DatasetAnswer",
    "DatasetRequest",
    "DeliveryOptions",
    "EventDraft",
    "GatewayError",
    "InvalidRequest",
    "Metrics",
    "NotFound",
    "PhoneForms",
    "PhoneMatch",
    "PlatformError",
    "PreparedEvent",
    "QueuedEvent",
    "Resolved",
    "SendOutcome",
    "Settings",
    "SinkState",
    "Store",
    "StoredEvent",
    "Unprocessable",
    "authorized_account",
    "hash_email",
    "hash_external_id",
    "hash_phone",
    "hookimpl",
    "invalid_phone",
    "is_sha256_hex",
    "json_response",
    "parse_phone",
    "query_account_id",
    "read_json",
    "sha256_hex",
]
