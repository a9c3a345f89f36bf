"""What stands between a browser and the console's pages: the session cookie, the API key
behind it, CSRF checks on every state-changing request, and the security headers.

Every refusal has the API's status (401 when signed out of a JSON-only place, 403 for another
account or a failed CSRF check), so the failed-authentication limits count it exactly as they
count the API's; it is the API's error envelope, or the same message on a page when a browser
loads the page.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import aiohttp_jinja2
from aiohttp import web

from gateway.config import AccountConfig, ConsoleConfig, Settings
from gateway.console.forms import Form
from gateway.console.sessions import Session, Sessions
from gateway.errors import Forbidden, GatewayError, Unauthorized
from gateway.http.auth import ApiKey, IPNetwork, trusted_peer
from gateway.http.handlers import account_for
from gateway.http.keys import CREDENTIALS, SETTINGS
from gateway.http.middlewares import error_response
from gateway.logs import bind, logged_param

__all__ = [
    "CONSOLE",
    "COOKIE",
    "CSP",
    "Console",
    "Viewer",
    "check_csrf",
    "check_same_origin",
    "http_url",
    "page",
    "redirect",
    "refusal",
    "safe_next",
    "security_headers",
    "segment",
    "set_session_cookie",
    "sign_in_location",
]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
COOKIE = "ctwa_console"


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

    def account(self, request: web.Request, account_id: str | None = None) -> AccountConfig:
        """Return the account the page's path (or ``account_id``) names, or raise 403/404
        as the API does."""
        if account_id is None:
            account_id = request.match_info["account_id"]
        return account_for(request, self.key, account_id)


def security_headers(response: web.StreamResponse) -> None:
    """Add the console's security headers; the app's middleware calls this for every answer
    under the console's path (pages, redirects, refusals, unknown paths, 405s, 429s)."""
    headers = response.headers
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "same-origin"
    headers.setdefault("Cache-Control", "no-store")  # the static assets say otherwise


def redirect(location: str) -> web.Response:
    """A 303 to ``location`` (after a POST, the browser GETs it)."""
    return web.Response(status=303, headers={"Location": location})


def segment(value: object) -> str:
    """Quote a value for one URL path segment ("/" too: event ids may hold one)."""
    return quote(str(value), safe="")


_HTTP_URL = re.compile(r"\Ahttps?://[^\x00-\x20\x7f]+\Z", re.IGNORECASE)


def http_url(value: object) -> bool:
    """Tell whether a value is an http(s) URL, the only kind the pages make a link of (an ad's
    link is whatever its author typed: ``javascript:`` too)."""
    return isinstance(value, str) and _HTTP_URL.match(value) is not None


_NEXT = re.compile(r"^/console/[A-Za-z0-9/_.~%?&=+:-]*\Z")


def safe_next(value: str | None, default: str) -> str:
    """Return ``value`` if it is a console path of this site, else ``default`` (a sign-in
    must never send the browser elsewhere)."""
    if value and _NEXT.match(value) and "//" not in value:
        # No dot segments, escaped or not: the browser resolves them out of /console/.
        segments = unquote(value.partition("?")[0]).split("/")
        if "." not in segments and ".." not in segments:
            return value
    return default


def sign_in_location(request: web.Request) -> str:
    """The sign-in page, with the page asked for (its whole query) to come back to."""
    # Everything but "/" is escaped: an unescaped "&" would end `next` at the first parameter.
    return f"{request.app[CONSOLE].path}/sign-in?next={quote(request.path_qs, safe='/')}"


def _forwarded(request: web.Request, name: str, trusted: Sequence[IPNetwork]) -> str | None:
    """The value a trusted proxy put in an X-Forwarded-* header (the last one, its own)."""
    value = request.headers.get(name)
    if value is None or not trusted_peer(request.remote, trusted):
        return None
    return value.rpartition(",")[2].strip().lower()


def _is_tls(request: web.Request, trusted: Sequence[IPNetwork]) -> bool:
    return request.secure or _forwarded(request, "X-Forwarded-Proto", trusted) == "https"


def _public_host(request: web.Request, trusted: Sequence[IPNetwork]) -> str:
    """The host the browser asked for: a trusted proxy's X-Forwarded-Host, else Host."""
    return _forwarded(request, "X-Forwarded-Host", trusted) or request.host.lower()


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
    # The key's name from the config (never the key): which integrator's key this browser
    # signed in with. (Bound as api_key, redaction replaced it.)
    bind(key_name=key.name)
    settings: Settings = request.app[SETTINGS]
    accounts = [a for a in settings.accounts if key.allows(a.id)]
    return Viewer(session_id, session, key, accounts)


PageHandler = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]


def page(handler: PageHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a console handler: signed out, a GET goes to the sign-in page (and any other
    method is refused); refusals are envelopes, or an error page for a browser."""

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
                return redirect(sign_in_location(request))
            return await handler(request, viewer)
        except GatewayError as exc:
            return refusal(request, exc)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def refusal(request: web.Request, exc: GatewayError) -> web.StreamResponse:
    """Answer a refusal: the API's envelope, or for a browser's page load (Accept:
    text/html) the same message on a page, with the same status."""
    bind(error_code=exc.code, error_param=logged_param(exc.param))
    if "text/html" not in request.headers.get("Accept", ""):
        return error_response(exc, headers=exc.headers or None)
    context = {
        "base": request.app[CONSOLE].path,
        "account": None,
        "nav": "error",
        "error": exc,
        # A page asked with bad choices (a custom period that ends before it starts): the
        # same page without them. The path is the router's, so it is this site's.
        "back": request.rel_url.raw_path
        if request.method == "GET" and request.query_string
        else None,
    }
    response = aiohttp_jinja2.render_template("error.html", request, context, status=exc.status)
    response.headers.update(exc.headers)
    return response


def _shown(value: str) -> str:
    # A header is quoted back only as printable ASCII: its raw bytes may be anything,
    # including what cannot be encoded in the answer at all.
    return "".join(ch if " " <= ch <= "~" else "?" for ch in value[:32])


def check_same_origin(request: web.Request) -> None:
    """Refuse a request a browser says came from another site (403).

    ``Sec-Fetch-Site: same-origin`` settles it (no page can forge a ``Sec-`` header); else
    the Origin must name the host the browser asked for: ``Host``, or behind a trusted
    proxy its ``X-Forwarded-Host`` (from anyone else that header is ignored).
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site == "same-origin":
        return
    if site is not None and site != "none":
        raise Forbidden(
            f"Refused: the browser says this request came from another site ({_shown(site)}).",
            code="csrf_cross_site",
            param="Sec-Fetch-Site",
        )
    origin = request.headers.get("Origin")
    if origin is None:
        return
    try:
        host: str | None = urlsplit(origin).netloc.lower()
    except ValueError:  # "http://[::1": not a URL at all
        host = None
    if host != _public_host(request, request.app[CONSOLE].trusted_proxies):
        raise Forbidden(
            "Refused: the request's Origin is not this console's; use the console's own forms"
            " (behind a reverse proxy: have it send `Host $host`, and list it in [server]"
            " trusted_proxies).",
            code="csrf_origin_mismatch",
            param="Origin",
        )


def check_csrf(request: web.Request, viewer: Viewer, form: Form) -> None:
    """Refuse a state-changing request without this session's CSRF token, or sent from
    another site (403)."""
    check_same_origin(request)
    presented = form.one("csrf") or request.headers.get("X-CSRF-Token") or ""
    expected = viewer.session.csrf_token
    if not hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode()):
        raise Forbidden(
            "Refused: the form's CSRF token is missing or wrong (a stale page, or a request"
            " made outside the console); reload the page and submit it again.",
            code="csrf_token_invalid",
            param="csrf",
        )
