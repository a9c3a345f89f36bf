"""Helpers for the console's HTTP-level tests: sign in, and read the session's CSRF token."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.console.guard import CONSOLE
from tests.conftest import API_KEY

Client = TestClient[web.Request, web.Application]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def signed_in(client: Client, key: str = API_KEY) -> str:
    """Sign in; return the session cookie's value."""
    resp = await client.post("/console/sign-in", data={"key": key}, allow_redirects=False)
    assert resp.status == 303, await resp.text()
    return resp.cookies["ctwa_console"].value


def csrf_of(client: Client) -> str:
    """Return the CSRF token of the newest session."""
    sessions = client.app[CONSOLE].sessions._sessions
    return list(sessions.values())[-1].csrf_token


async def page_status(
    client: Client, cookie: str, path: str = "/console/accounts/acme/health"
) -> int:
    """Return the status of a page loaded with this session cookie alone (303: signed out)."""
    client.session.cookie_jar.clear()
    resp = await client.get(
        path, headers={"Cookie": f"ctwa_console={cookie}"}, allow_redirects=False
    )
    return resp.status
