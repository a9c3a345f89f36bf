"""Reading request bodies with a per-route size limit."""

from __future__ import annotations

from aiohttp import web

from gateway.errors import PayloadTooLarge, UnsupportedMediaType

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
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    body = await request.read()
    if len(body) > limit:
        raise too_large(limit)
    return body


async def read_json_body(request: web.Request, limit: int) -> bytes:
    """Return the raw body of a JSON request, or raise 415 (not JSON) / 413 (too large)."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {request.content_type or 'none'!r};"
            " send `-H 'Content-Type: application/json'`.",
            param="Content-Type",
        )
    return await read_body(request, limit)
