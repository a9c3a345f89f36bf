"""What stands between a browser and the console's pages: the session cookie, the API key
behind it, CSRF checks on every state-changing request, and the security headers.

Every refusal is the API's error envelope with the API's status (401 when signed out of a
JSON-only place, 403 for another account or a failed CSRF check), so the failed-authentication
limits count it exactly as they count the API's.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from aiohttp import web

from gateway.config import AccountConfig, ConsoleConfig, Settings
from gateway.console.sessions import Session, Sessions
from gateway.errors import Forbidden, GatewayError, InvalidRequest, Unauthorized
from gateway.http.auth import ApiKey, IPNetwork, KeyRing
from gateway.http.body import too_large
from gateway.http.keys import CREDENTIALS, PIPELINE, SETTINGS
from gateway.http.middlewares import error_response
from gateway.logs import bind

__all__ = [
    "CONSOLE",
    "COOKIE",
    "CSP",
    "Console",
    "Viewer",
    "check_csrf",
    "check_same_origin",
    "form_of",
    "page",
    "protect",
    "redirect",
    "safe_next",
    "set_session_cookie",
]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
COOKIE = "ctwa_console"
_FORM_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class Console:
    """The console's state, on the app."""

    path: str
    config: ConsoleConfig
    sessions: Sessions
    trusted_proxies: Sequence[IPNetwork]


CONSOLE = web.AppKey("console", Console)


@dataclass(frozen=True)
class Viewer:
    """A signed-in browser: its session (id and CSRF token) and the key it signed in with."""

    session_id: str
    session: Session
    key: ApiKey
    # The accounts this key may see, in config order.
    accounts: list[AccountConfig]

    def account(self, request: web.Request) -> AccountConfig:
        """Return the account the page's path names, or raise 403/404 as the API does."""
        account_id = request.match_info["account_id"]
        bind(account=account_id[:128])
        KeyRing.authorize(self.key, account_id)
        return request.app[PIPELINE].account(account_id)


def protect(response: web.StreamResponse, *, cache: bool = False) -> web.StreamResponse:
    """Add the console's security headers (every console response has them)."""
    headers = response.headers
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "same-origin"
    headers["Cache-Control"] = "public, max-age=3600" if cache else "no-store"
    return response


def redirect(location: str) -> web.Response:
    """A 303 to ``location`` (after a POST, the browser GETs it)."""
    return web.Response(status=303, headers={"Location": location})


_NEXT = re.compile(r"^/console/[A-Za-z0-9/_.~%?&=+:-]*\Z")


def safe_next(value: str | None, default: str) -> str:
    """Return ``value`` if it is a console path of this site, else ``default`` (a sign-in
    must never send the browser elsewhere)."""
    if value and _NEXT.match(value) and "//" not in value:
        return value
    return default


def _is_tls(request: web.Request, trusted: Sequence[IPNetwork]) -> bool:
    if request.secure:
        return True
    if request.headers.get("X-Forwarded-Proto", "").lower() != "https":
        return False
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    return any(peer in network for network in trusted)


def set_session_cookie(response: web.StreamResponse, request: web.Request, value: str) -> None:
    """Set (or, with an empty value, clear) the session cookie."""
    console = request.app[CONSOLE]
    response.set_cookie(
        COOKIE,
        value,
        path=console.path,
        max_age=int(console.config.session_ttl_s) if value else 0,
        httponly=True,
        samesite="Strict",
        secure=_is_tls(request, console.trusted_proxies),
    )


def _viewer(request: web.Request) -> Viewer | None:
    session_id = request.cookies.get(COOKIE, "")
    if not session_id or len(session_id) > 128:
        return None
    sessions = request.app[CONSOLE].sessions
    session = sessions.get(session_id)
    if session is None:
        return None
    key = request.app[CREDENTIALS].keys.by_digest(session.key_digest)
    if key is None:
        sessions.end(session_id)  # the key was revoked or rotated
        return None
    bind(api_key=key.name)
    settings: Settings = request.app[SETTINGS]
    accounts = [a for a in settings.accounts if key.allows(a.id)]
    return Viewer(session_id, session, key, accounts)


PageHandler = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]


def page(handler: PageHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a console handler: signed out, a GET goes to the sign-in page (and any other
    method is refused); refusals are envelopes; every answer gets the security headers."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            viewer = _viewer(request)
            if viewer is None:
                if request.method != "GET":
                    raise Unauthorized(
                        "Your console session has ended (signed out or expired); sign in"
                        " again at /console/sign-in.",
                        code="session_required",
                    )
                path = request.app[CONSOLE].path
                target = quote(request.path_qs, safe="/?&=")
                response: web.StreamResponse = redirect(f"{path}/sign-in?next={target}")
            else:
                response = await handler(request, viewer)
        except GatewayError as exc:
            bind(error_code=exc.code, error_param=None if exc.param is None else exc.param[:100])
            response = error_response(exc, headers=exc.headers or None)
        return protect(response)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


async def form_of(request: web.Request) -> dict[str, str]:
    """Return a form POST's fields (each at most once), or raise 400/413."""
    if (request.content_length or 0) > _FORM_MAX_BYTES:
        raise too_large(_FORM_MAX_BYTES)
    if request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        raise InvalidRequest(
            "Send the console's forms as application/x-www-form-urlencoded.",
            code="unsupported_media_type",
            status=415,
        )
    try:
        posted = await request.post()
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The form could not be read.", code="invalid_form") from None
    fields: dict[str, str] = {}
    for name, value in posted.items():
        if not isinstance(value, str):
            raise InvalidRequest(f"`{name[:64]}` must be text.", code="invalid_field", param=name)
        if name in fields:
            raise InvalidRequest(
                f"`{name[:64]}` appears more than once in the form; send it once.",
                code="invalid_field",
                param=name,
            )
        fields[name] = value
    return fields


def check_same_origin(request: web.Request) -> None:
    """Refuse a request a browser says came from another site (403)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise Forbidden(
            f"Refused: the browser says this request came from another site ({site[:32]}).",
            code="csrf_cross_site",
        )
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
        raise Forbidden(
            "Refused: the request's Origin is not this console's; use the console's own forms.",
            code="csrf_origin_mismatch",
        )


def check_csrf(request: web.Request, viewer: Viewer, fields: dict[str, str]) -> None:
    """Refuse a state-changing request without this session's CSRF token, or sent from
    another site (403)."""
    check_same_origin(request)
    presented = fields.get("csrf") or request.headers.get("X-CSRF-Token") or ""
    expected = viewer.session.csrf_token
    if not hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode()):
        raise Forbidden(
            "Refused: the form's CSRF token is missing or wrong (a stale page, or a request"
            " made outside the console); reload the page and submit it again.",
            code="csrf_token_invalid",
            param="csrf",
        )
