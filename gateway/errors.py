"""The errors the gateway answers with, each carrying its HTTP status and stable ``code``.

Every 4xx the API returns is one of these, rendered into Zernio's error envelope
(``error``, ``type``, ``code``, ``param``, ``details``) by the error middleware. Plugins raise
them too (a resolver raises :class:`NotFound` for an unknown conversation), which is why they
live in one small module that :mod:`gateway` re-exports.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ConfigError",
    "Conflict",
    "Forbidden",
    "GatewayError",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "PlatformError",
    "RateLimited",
    "RequestTimeout",
    "ServiceUnavailable",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
    "UsageError",
]


class ConfigError(Exception):
    """The configuration cannot be loaded; the message names the file and the ``$.path``."""


class UsageError(Exception):
    """The command line is wrong (a missing file, an unknown sink): one line, exit 2."""


class GatewayError(Exception):
    """An error with a place in the API's error envelope."""

    status: int = 500
    type: ClassVar[str] = "api_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        details: dict[str, Any] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        # Extra response headers (Retry-After on 429 and 503).
        self.headers: dict[str, str] = {}
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.details = details or {}


class InvalidRequest(GatewayError):
    """The body or query is malformed or fails validation (400)."""

    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"


class Unauthorized(GatewayError):
    """No API key, or one the gateway does not know (401)."""

    status = 401
    type = "authentication_error"
    default_code = "unauthorized"


class Forbidden(GatewayError):
    """A valid key that may not act for the requested account (403)."""

    status = 403
    type = "permission_error"
    default_code = "forbidden"


class NotFound(GatewayError):
    """An unknown account, conversation, event or route (404)."""

    status = 404
    type = "not_found"
    default_code = "not_found"


class Conflict(GatewayError):
    """The request conflicts with what is stored (409)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(GatewayError):
    """The body exceeds ``server.max_body_bytes`` (413)."""

    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class RequestTimeout(GatewayError):
    """The body did not arrive within ``server.body_timeout_s`` (408); the connection closes."""

    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class UnsupportedMediaType(GatewayError):
    """The body is not ``application/json`` (415)."""

    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class Unprocessable(GatewayError):
    """Well-formed, but nothing can be attributed (422): e.g. no captured ``ctwa_clid``."""

    status = 422
    type = "invalid_request_error"
    default_code = "unprocessable"


class PlatformError(GatewayError):
    """Meta refused or failed a request made on the caller's behalf (502)."""

    status = 502
    type = "platform_error"
    default_code = "platform_error"

    def __init__(
        self, message: str, *, code: str | None = None, platform_error: Any = None
    ) -> None:
        super().__init__(message, code=code)
        self.platform = "metaads"
        # Meta's raw error object, for the caller to act on (never carries our token).
        self.platform_error = platform_error


class RateLimited(GatewayError):
    """The key is over its request rate (429)."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limited"


class ServiceUnavailable(GatewayError):
    """The gateway cannot take the request right now; nothing was accepted (503)."""

    status = 503
    type = "api_error"
    default_code = "unavailable"
