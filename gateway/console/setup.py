"""Mount the console on the app: templates, static assets, sign-in and sign-out, pages."""

from __future__ import annotations

import importlib.resources
import ipaddress
import mimetypes
from typing import Literal

import aiohttp_jinja2
import jinja2
import structlog
from aiohttp import web

from gateway.config import Settings
from gateway.console import event_pages, pages
from gateway.console.forms import form_of
from gateway.console.guard import (
    CONSOLE,
    COOKIE,
    Console,
    Viewer,
    check_csrf,
    check_same_origin,
    http_url,
    page,
    redirect,
    refusal,
    safe_next,
    segment,
    set_session_cookie,
)
from gateway.console.sessions import Sessions
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.http.keys import CREDENTIALS
from gateway.http.query import QueryStruct, parse_query

__all__ = ["CONSOLE_PATH", "setup_console"]

CONSOLE_PATH = "/console"
log = structlog.get_logger()
routes = web.RouteTableDef()
# Static assets: name -> (bytes, content type), read from the package once at startup.
_ASSETS = web.AppKey("console_assets", dict[str, tuple[bytes, str]])


def _load_assets() -> dict[str, tuple[bytes, str]]:
    root = importlib.resources.files("gateway.console") / "static"
    assets: dict[str, tuple[bytes, str]] = {}
    folders = [("", root)]
    while folders:
        prefix, folder = folders.pop()
        for item in folder.iterdir():
            name = f"{prefix}{item.name}"
            if item.is_dir():
                folders.append((f"{name}/", item))
                continue
            kind = mimetypes.guess_type(item.name)[0] or "text/plain"
            assets[name] = (item.read_bytes(), kind)
    return assets


@routes.get(f"{CONSOLE_PATH}/static/{{name:.+}}")
async def static(request: web.Request) -> web.StreamResponse:
    """The console's scripts, styles and licences (no session needed)."""
    found = request.app[_ASSETS].get(request.match_info["name"])
    if found is None:
        raise NotFound("No such console asset.", code="route_not_found")
    body, kind = found
    charset = "utf-8" if kind.startswith(("text/", "application/javascript")) else None
    response = web.Response(body=body, content_type=kind, charset=charset)
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


class IndexQuery(QueryStruct, frozen=True):
    """The account switcher's choice: an account, and the page to show of it."""

    account: str | None = None
    page: Literal["overview", "ads", "events", "conversations", "health"] = "overview"


@routes.get(CONSOLE_PATH)
@routes.get(f"{CONSOLE_PATH}/")
@page
async def index(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """The chosen account's page (the switcher's form), else the first account's overview
    (or a page saying the key sees none)."""
    query = parse_query(request, IndexQuery, drop_empty=True)
    if query.account is not None:
        account = viewer.account(request, query.account)  # 403/404 as the API answers
        return redirect(f"{CONSOLE_PATH}/accounts/{segment(account.id)}/{query.page}")
    if not viewer.accounts:
        raise NotFound(
            f"API key {viewer.key.name!r} may not see any configured account.",
            code="account_not_found",
        )
    return redirect(f"{CONSOLE_PATH}/accounts/{segment(viewer.accounts[0].id)}/overview")


@routes.get(f"{CONSOLE_PATH}/sign-in")
async def sign_in_form(request: web.Request) -> web.StreamResponse:
    """The sign-in form."""
    target = safe_next(request.query.get("next"), f"{CONSOLE_PATH}/")
    return aiohttp_jinja2.render_template(
        "sign_in.html",
        request,
        {"base": CONSOLE_PATH, "next": target, "nav": "sign-in", "account": None},
    )


@routes.post(f"{CONSOLE_PATH}/sign-in")
async def sign_in(request: web.Request) -> web.StreamResponse:
    """Check the key (a wrong one counts as a failed authentication); open a session, and
    end the one this browser had."""
    try:
        check_same_origin(request)  # a sign-in made from another site is refused (login CSRF)
        form = await form_of(request)
        presented = form.one("key").strip()
        if not presented:
            raise InvalidRequest("Enter an API key to sign in.", code="missing_field", param="key")
        _, digest = request.app[CREDENTIALS].keys.sign_in(presented)
    except GatewayError as exc:
        return refusal(request, exc)
    sessions = request.app[CONSOLE].sessions
    previous = request.cookies.get(COOKIE, "")
    if previous and len(previous) <= 128:
        sessions.end(previous)
    session_id = sessions.start(digest)
    response = redirect(safe_next(form.one("next"), f"{CONSOLE_PATH}/"))
    set_session_cookie(response, request, session_id)
    log.info("console_signed_in")
    return response


@routes.post(f"{CONSOLE_PATH}/sign-out")
@page
async def sign_out(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """End the session (its id is worthless from now on) and clear the cookie."""
    check_csrf(request, viewer, await form_of(request))
    request.app[CONSOLE].sessions.end(viewer.session_id)
    response = redirect(f"{CONSOLE_PATH}/sign-in")
    set_session_cookie(response, request, "")
    log.info("console_signed_out")
    return response


def setup_console(app: web.Application, settings: Settings) -> list[web.RouteDef]:
    """Put the console's state on ``app``; return its routes (the app adds them)."""
    app[CONSOLE] = Console(
        path=CONSOLE_PATH,
        config=settings.console,
        sessions=Sessions(
            ttl_s=settings.console.session_ttl_s,
            max_sessions=settings.console.max_sessions,
            max_per_key=settings.console.max_sessions_per_key,
        ),
        trusted_proxies=[
            ipaddress.ip_network(p, strict=False) for p in settings.server.trusted_proxies
        ],
    )
    app[_ASSETS] = _load_assets()
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("gateway.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        # Ids go into URL paths quoted whole: Jinja's urlencode keeps "/" (and an event id
        # may hold one).
        filters={"segment": segment},
    )
    # Links people put in ads reach the pages: only http(s) ones become links.
    env.tests["http_url"] = http_url
    found: list[web.RouteDef] = []
    for table in (routes, pages.routes, event_pages.routes):
        found.extend(r for r in table if isinstance(r, web.RouteDef))
    return found
