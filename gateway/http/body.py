"""Reading request bodies with a per-route size limit."""

from __future__ import annotations

from aiohttp import web

from gateway.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

__all__ = ["read_body", "read_json_body", "too_large"]


def too_large(limit: int) -> PayloadTooLarge:
    """Return the 413 for a body over ``limit`` bytes."""
    return PayloadTooLarge(
        f"The body is larger than the {limit} bytes this endpoint accepts.",
        details={"maxBodyBytes": limit},
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    """Return the raw body, or raise 413 if it is over ``limit`` bytes."""
    # Refuse early on a declared length, before reading anything.
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    try:
        # A compressed body's Content-Length is what was sent, not what it inflates to:
        # streamed like a chunked one, it inflates only to the limit (a 9 KiB gzip inflating
        # to 9 MiB reaches the route's 413, not aiohttp's bound for the largest route).
        if length is None or "Content-Encoding" in request.headers:
            body = await _read_up_to(request, limit)
        else:
            body = await request.read()  # framed by its Content-Length, checked above
    except web.HTTPException:
        raise  # aiohttp's own 413 past client_max_size
    except Exception as exc:
        # A body that cannot be read as sent: a broken Content-Encoding (gzip, deflate...), a
        # connection cut mid-body. The client's fault, so a 400 naming the header.
        raise InvalidRequest(
            f"The body could not be read ({type(exc).__name__}): send it uncompressed, or with a"
            " Content-Encoding that matches it.",
            code="unreadable_body",
            param="Content-Encoding",
        ) from None
    if len(body) > limit:
        raise too_large(limit)
    return body


async def _read_up_to(request: web.Request, limit: int) -> bytes:
    # A chunked body declares no length: stop one chunk past the limit (the caller answers
    # 413) rather than take in everything up to client_max_size, the largest route's limit.
    body = bytearray()
    while len(body) <= limit and (chunk := await request.content.readany()):
        body.extend(chunk)
    return bytes(body)


async def read_json_body(request: web.Request, limit: int) -> bytes:
    """Return the raw body of a JSON request, or raise 415 (not JSON) / 413 (too large)."""
    # The header as nearly every client sends it needs no parsing (aiohttp's parse copies
    # its parameters into a new dict for every request).
    if (
        request.headers.get("Content-Type") != "application/json"
        and request.content_type != "application/json"
    ):
        # The header as sent (aiohttp reads one it cannot parse as application/octet-stream).
        given = request.headers.get("Content-Type", "none")[:100]
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {given!r};"
            " send `-H 'Content-Type: application/json'`.",
            param="Content-Type",
        )
    return await read_body(request, limit)
