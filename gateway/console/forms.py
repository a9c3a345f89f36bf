"""The console's form posts: read with a bound, decoded as UTF-8, fields named once or repeated.

Sign-in is reachable without a session, so its body is held to :data:`FORM_MAX_BYTES` while it
is read (a chunked body has no Content-Length to refuse up front). Every problem is a 4xx
envelope naming the header or field to fix.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from aiohttp import web

from gateway.errors import InvalidRequest, UnsupportedMediaType
from gateway.http.body import read_body
from gateway.http.keys import SETTINGS

__all__ = ["FORM_MAX_BYTES", "Form", "form_of"]

# The console's forms carry a key, a token and a few filters: 64 KiB is generous.
FORM_MAX_BYTES = 64 * 1024
_FORM_TYPE = "application/x-www-form-urlencoded"
# The pages declare UTF-8, so browsers post UTF-8 (and ASCII is a part of it).
_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


class Form:
    """A posted form's fields, in order; a field may repeat only where the form repeats it."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs

    def one(self, name: str) -> str:
        """Return the field's value ("" when absent), or raise 400 if it was sent twice."""
        values = self.all(name)
        if len(values) > 1:
            raise InvalidRequest(
                f"`{name}` appears more than once in the form; send it once.",
                code="invalid_field",
                param=name,
            )
        return values[0] if values else ""

    def all(self, name: str) -> list[str]:
        """Return every value of a repeated field (one per event id, one per status)."""
        return [value for key, value in self._pairs if key == name]


async def form_of(request: web.Request) -> Form:
    """Return a form POST's fields, or raise 413 (too large), 415 (not a UTF-8 urlencoded
    form) or 400 (not decodable)."""
    if request.content_type != _FORM_TYPE:
        raise UnsupportedMediaType(
            "Send the console's forms as application/x-www-form-urlencoded.",
            param="Content-Type",
        )
    charset = (request.charset or "utf-8").lower()
    if charset not in _CHARSETS:
        raise UnsupportedMediaType(
            "Send the console's forms in UTF-8 (`charset=utf-8`, or no charset).",
            code="unsupported_charset",
            param="Content-Type",
        )
    body = await read_body(
        request, FORM_MAX_BYTES, timeout_s=request.app[SETTINGS].server.body_timeout_s
    )
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest(
            "The form is not valid UTF-8 (raw or percent-encoded); send it as the console's"
            " pages do.",
            code="invalid_form",
        ) from None
    return Form(pairs)
