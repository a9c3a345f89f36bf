"""Reading request bodies: a size limit per route, a deadline for every body, and a budget
for the bytes of bodies being received whose sender is not known yet."""

from __future__ import annotations

import asyncio
import contextlib
import math
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    UnsupportedMediaType,
)

__all__ = [
    "MAX_GZIP_MEMBERS",
    "BodyBudget",
    "inflate",
    "read_body",
    "read_json_body",
    "too_large",
]


def too_large(limit: int) -> PayloadTooLarge:
    """Return the 413 for a body over ``limit`` bytes."""
    return PayloadTooLarge(
        f"The body is larger than the {limit} bytes this endpoint accepts.",
        details={"maxBodyBytes": limit},
    )


async def read_body(
    request: web.Request, limit: int, *, timeout_s: float, budget: BodyBudget | None = None
) -> bytes:
    """Return the raw body (inflated, if it was sent compressed), or raise 413 if it is over
    ``limit`` bytes, 415 for a Content-Encoding the gateway does not take, 408 if it has not
    all arrived ``timeout_s`` after this started reading it, 503 if ``budget`` (the bytes
    of bodies being read at once) runs out while it is read."""
    # Refuse early on a declared length, before reading anything.
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    if budget is not None:
        with budget.holding() as charge:
            return await _read_in_time(request, length, limit, timeout_s, charge)
    return await _read_in_time(request, length, limit, timeout_s, None)


# Counts the bytes of a body as they are read (raising when there is no room for them).
Charge = Callable[[int], None]


async def _read_in_time(
    request: web.Request, length: int | None, limit: int, timeout_s: float, charge: Charge | None
) -> bytes:
    if request.content.is_eof():
        # All of it came in with the headers (a conversion nearly always does): nothing to
        # wait for, so no timer on the hot path.
        body = await _read(request, length, limit, charge)
    else:
        try:
            async with asyncio.timeout(timeout_s):
                body = await _read(request, length, limit, charge)
        except TimeoutError:
            # What had arrived is dropped here; aiohttp drains the rest (for as long as
            # lingering_time, the same deadline) and closes the connection.
            raise RequestTimeout(
                f"The body did not arrive within {timeout_s:g} s; send all of it at once,"
                " as soon as the headers (the limit is [server] body_timeout_s).",
                details={"bodyTimeoutSeconds": timeout_s},
            ) from None
    if len(body) > limit:
        raise too_large(limit)
    return body


async def _read(
    request: web.Request, length: int | None, limit: int, charge: Charge | None
) -> bytes:
    encoding = request.headers.get("Content-Encoding")
    try:
        if encoding is not None:
            return await _inflated(request, encoding, limit, charge)
        if length is None or charge is not None:
            return await _read_up_to(request, limit, charge)
        return await request.read()  # framed by its Content-Length, checked above
    except (web.HTTPException, GatewayError):
        raise  # aiohttp's own 413 past client_max_size, or ours
    except Exception as exc:
        # A body that cannot be read as sent: a broken Content-Encoding (gzip, deflate...), a
        # connection cut mid-body. The client's fault, so a 400 naming the header. (The
        # deadline's cancellation is not an Exception: it goes on up to the timeout.)
        raise InvalidRequest(
            f"The body could not be read ({type(exc).__name__}): send it uncompressed, or with a"
            " Content-Encoding that matches it.",
            code="unreadable_body",
            param="Content-Encoding",
        ) from None


class BodyBudget:
    """The bytes of bodies being read at once, up to ``capacity``: what senders nobody has
    authenticated yet (a webhook's signature covers its body) can make the gateway hold.

    A body is counted by the bytes actually read, as they arrive, until it is whole or
    refused: a sender that only declares a large Content-Length holds nothing (aiohttp keeps
    at most a small buffer per connection unread), so holding the budget takes sending that
    many bytes, again every body deadline. A body that finds no room is refused (503).
    """

    def __init__(self, capacity: int, *, retry_after_s: float) -> None:
        self.capacity = capacity
        self.taken = 0
        self._retry_after = str(max(1, math.ceil(retry_after_s)))

    @contextlib.contextmanager
    def holding(self) -> Iterator[Charge]:
        """Count one body's bytes as they are read (the callable raises 503 with Retry-After
        when they do not fit); all given back when it is done."""
        held = 0

        def charge(size: int) -> None:
            nonlocal held
            if self.taken + size > self.capacity:
                raise self._busy()
            self.taken += size
            held += size

        try:
            yield charge
        finally:
            self.taken -= held

    def _busy(self) -> ServiceUnavailable:
        error = ServiceUnavailable(
            "Too many notifications are being received at once; this one was not taken."
            " Retry shortly (Meta does by itself).",
            code="webhook_busy",
            details={"maxBytesInFlight": self.capacity},
        )
        error.headers["Retry-After"] = self._retry_after
        return error


async def _inflated(
    request: web.Request, encoding: str, limit: int, charge: Charge | None
) -> bytes:
    """The body inflated here, not by aiohttp (the app turns its decompression off): only up
    to ``limit`` read and ``limit`` inflated, whatever the Content-Length says (what was sent,
    not what it inflates to), and a coding the gateway does not take is a 415 in the envelope,
    not aiohttp's plain-text 400."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return await _read_up_to(request, limit, charge)
    if name not in _INFLATABLE:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed,"
            " or with gzip or deflate.",
            code="unsupported_content_encoding",
            param="Content-Encoding",
        )
    compressed = await _read_up_to(request, limit, charge)
    if len(compressed) > limit:
        raise too_large(limit)  # sent: more than the limit before inflating a byte
    return inflate(name, compressed, limit)


def inflate(name: str, compressed: bytes, limit: int) -> bytes:
    """``compressed`` inflated (``name``: gzip, x-gzip or deflate), at most ``limit`` bytes
    of it (413 past that); a gzip body of more than :data:`MAX_GZIP_MEMBERS` members is a 400.

    The input goes to zlib a window at a time: what follows the end of a member comes back
    as a copy (``unused_data``), and copying the rest of the body at each of thousands of
    empty members (20 bytes each) held the loop for seconds, before any signature or key
    was checked (found by review).
    """
    view = memoryview(compressed)
    body = bytearray()
    at = members = 0
    while at < len(view):
        members += 1
        if members > MAX_GZIP_MEMBERS or (members > 1 and name == "deflate"):
            # What follows a gzip member is another member (gzip's own rule); nothing may
            # follow a deflate stream.
            what = (
                "a deflate stream with data after its end"
                if name == "deflate"
                else f"more than {MAX_GZIP_MEMBERS} gzip members"
            )
            raise InvalidRequest(
                f"The body is {what}; send it as one compressed stream, or uncompressed.",
                code="unreadable_body",
                param="Content-Encoding",
            )
        inflater = _inflater(name, view[at : at + 2])
        while not inflater.eof:
            if at >= len(view):
                raise EOFError("the compressed stream ends early")
            window = view[at : at + _WINDOW]
            body += inflater.decompress(window, limit + 1 - len(body))
            if len(body) > limit or inflater.unconsumed_tail:
                raise too_large(limit)
            at += len(window) - len(inflater.unused_data)
    return bytes(body)


# Members a gzip body may have: one is what clients send (concatenated files are a tool's
# habit, not an HTTP client's).
MAX_GZIP_MEMBERS = 64
# Compressed bytes given to zlib at once.
_WINDOW = 64 * 1024


def _inflater(name: str, head: memoryview) -> Any:
    if name != "deflate":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)  # a gzip member
    # HTTP's deflate is a zlib stream; some clients send raw deflate (no zlib header), which
    # aiohttp took too: a zlib header's first byte says "deflate" in its low four bits, and
    # its first two bytes are a multiple of 31.
    zlib_header = (
        len(head) >= 2 and head[0] & 0x0F == 8 and int.from_bytes(head[:2], "big") % 31 == 0
    )
    return zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)


# Content-Encoding values the gateway inflates (HTTP's "deflate" is a zlib stream).
_INFLATABLE = frozenset({"gzip", "x-gzip", "deflate"})


async def _read_up_to(request: web.Request, limit: int, charge: Charge | None = None) -> bytes:
    # A chunked body declares no length: stop one chunk past the limit (the caller answers
    # 413) rather than take in everything up to client_max_size, the largest route's limit.
    body = bytearray()
    while len(body) <= limit and (chunk := await request.content.readany()):
        if charge is not None:
            charge(len(chunk))
        body.extend(chunk)
    return bytes(body)


async def read_json_body(request: web.Request, limit: int, *, timeout_s: float) -> bytes:
    """Return the raw body of a JSON request, or raise 415 (not JSON), 413 (too large) or
    408 (not all there within ``timeout_s``)."""
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
    return await read_body(request, limit, timeout_s=timeout_s)
