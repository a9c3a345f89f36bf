"""Reading request bodies with a per-route size limit."""

from __future__ import annotations

import zlib

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
    """Return the raw body (inflated, if it was sent compressed), or raise 413 if it is over
    ``limit`` bytes, 415 for a Content-Encoding the gateway does not take."""
    # Refuse early on a declared length, before reading anything.
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    encoding = request.headers.get("Content-Encoding")
    try:
        if encoding is not None:
            body = await _inflated(request, encoding, limit)
        elif length is None:
            body = await _read_up_to(request, limit)
        else:
            body = await request.read()  # framed by its Content-Length, checked above
    except (web.HTTPException, PayloadTooLarge, UnsupportedMediaType):
        raise  # aiohttp's own 413 past client_max_size, or ours
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


async def _inflated(request: web.Request, encoding: str, limit: int) -> bytes:
    """The body inflated here, not by aiohttp (the app turns its decompression off): only up
    to ``limit``, whatever the Content-Length (what was sent, not what it inflates to), and a
    coding the gateway does not take is a 415 in the envelope, not aiohttp's plain-text 400."""
    name = encoding.strip().lower()
    if name == "identity":
        return await _read_up_to(request, limit)
    if name not in _INFLATABLE:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed,"
            " or with gzip or deflate.",
            code="unsupported_content_encoding",
            param="Content-Encoding",
        )
    # 32 + 15: a gzip or a zlib stream, whichever header it starts with.
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)
    body = bytearray()
    while chunk := await request.content.readany():
        body += inflater.decompress(chunk, limit + 1 - len(body))
        if len(body) > limit or inflater.unconsumed_tail:
            raise too_large(limit)
    body += inflater.flush()
    if not inflater.eof:
        raise EOFError("the compressed stream ends early")
    return bytes(body)


# Content-Encoding values the gateway inflates (HTTP's "deflate" is a zlib stream).
_INFLATABLE = frozenset({"gzip", "x-gzip", "deflate"})


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
