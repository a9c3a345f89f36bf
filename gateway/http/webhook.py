"""WhatsApp Cloud API webhook: the verification handshake and signed notifications.

Bytes first, signature second, then :func:`gateway.capture.inbox.receive`: nothing unsigned
is parsed, let alone stored. The answer comes after the notification is stored (with what it
captured, or alone when processing failed), so a 200 means Meta may forget it; only a
notification that could not be stored gets a 503, which Meta retries (for 7 days).
"""

from __future__ import annotations

import msgspec
import structlog
from aiohttp import web

from gateway.capture.inbox import receive
from gateway.errors import Forbidden, InvalidRequest, ServiceUnavailable, Unauthorized
from gateway.http.body import read_body
from gateway.http.keys import CREDENTIALS, METRICS, PIPELINE, SETTINGS, WEBHOOK_BODIES
from gateway.http.signature import signature_matches
from gateway.logs import bind, bound
from gateway.wire import ENCODER

__all__ = ["routes"]

routes = web.RouteTableDef()
log = structlog.get_logger()

_MAX_CHALLENGE = 256


@routes.get("/webhooks/whatsapp")
async def verify(request: web.Request) -> web.Response:
    """Meta's subscription handshake: echo ``hub.challenge`` if the verify token is ours."""
    query = request.query
    secrets = request.app[CREDENTIALS].webhook
    challenge = query.get("hub.challenge", "")
    if query.get("hub.mode") != "subscribe" or not secrets.token_matches(
        query.get("hub.verify_token", "")
    ):
        log.warning("webhook_verification_refused", configured=secrets.verify_token is not None)
        raise Forbidden(
            "Verification refused: hub.mode must be subscribe and hub.verify_token must equal"
            " the secret named by [webhook] verify_token_env.",
            code="verification_failed",
        )
    # Only a caller holding the verify token learns that its challenge is what is wrong.
    if not 0 < len(challenge) <= _MAX_CHALLENGE:
        raise InvalidRequest(
            f"Send `hub.challenge` (1 to {_MAX_CHALLENGE} characters): the handshake echoes it.",
            code="invalid_field",
            param="hub.challenge",
        )
    return web.Response(text=challenge, content_type="text/plain")


@routes.post("/webhooks/whatsapp")
async def notify(request: web.Request) -> web.Response:
    """Verify one notification (up to 1,000 updates), then capture and archive it."""
    settings = request.app[SETTINGS]
    app_secret = request.app[CREDENTIALS].webhook.app_secret
    if app_secret is None:
        # Fail closed; 503 makes Meta retry, so nothing is lost while the secret is set up.
        raise ServiceUnavailable(
            "Webhook not configured: set the app secret in the variable [webhook]"
            " app_secret_env names.",
            code="webhook_not_configured",
        )
    limit = settings.webhook.max_body_bytes
    # Unsigned until it is whole: its bytes, as they arrive, count against what anonymous
    # senders may hold, and past that it is refused (503), so slow or oversized bodies cannot
    # pin the memory (and a body only declared holds nothing).
    try:
        body = await read_body(
            request,
            limit,
            timeout_s=settings.server.body_timeout_s,
            budget=request.app[WEBHOOK_BODIES],
        )
    except ServiceUnavailable as exc:
        if exc.code == "webhook_busy":
            request.app[METRICS].webhook_bodies_refused.inc()
        raise
    if not signature_matches(app_secret, body, request.headers.get("X-Hub-Signature-256")):
        request.app[METRICS].webhook_signature_failures.inc()
        log.warning(
            "webhook_signature_rejected",
            present="X-Hub-Signature-256" in request.headers,
            body_bytes=len(body),
        )
        raise Unauthorized(
            "Invalid or missing X-Hub-Signature-256: it must be sha256=<hex HMAC-SHA256 of the"
            " exact body with the app secret>.",
            code="invalid_signature",
        )
    request_id = bound().get("request_id")
    result = await receive(
        request.app[PIPELINE].store,
        settings,
        request.app[METRICS],
        body,
        request_id=request_id,
    )
    bind(notification_id=result.notification_id)
    log.info(
        "webhook_captured",
        **msgspec.structs.asdict(msgspec.structs.replace(result, problems=[])),
    )
    # 200 once the notification is stored, whatever processing found: Meta would only retry
    # what we keep. The answer lists what was not processed.
    return web.Response(body=ENCODER.encode(result), content_type="application/json")
