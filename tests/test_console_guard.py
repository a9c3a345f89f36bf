"""The console's safety nets at the HTTP level: CSP and headers on every answer, cookie
flags, session expiry and revocation, failed sign-ins counted, CSRF and origin checks, bad
input answered 4xx in the envelope, and the switch that turns the console off."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import parse_settings
from gateway.console.guard import CONSOLE, CSP
from gateway.console.sessions import Sessions
from gateway.http.app import reload_secrets
from tests.conftest import API_KEY, ENV, ClientFactory

Client = TestClient[web.Request, web.Application]


async def signed_in(client: Client, key: str = API_KEY) -> str:
    """Sign in; return the session cookie's value."""
    resp = await client.post("/console/sign-in", data={"key": key}, allow_redirects=False)
    assert resp.status == 303, await resp.text()
    return resp.cookies["ctwa_console"].value


async def csrf_of(client: Client) -> str:
    (session,) = client.app[CONSOLE].sessions._sessions.values()
    return session.csrf_token


@pytest.mark.parametrize(
    "path",
    [
        "/console/sign-in",
        "/console/static/console.js",
        "/console/accounts/acme/overview",
        "/console/accounts/nobody/overview",
        "/console/accounts/acme/events/missing",
        "/console/accounts/acme/overview?period=fortnight",
    ],
)
async def test_every_console_answer_carries_the_csp(client: Client, path: str) -> None:
    await signed_in(client)
    resp = await client.get(path, allow_redirects=False)
    assert resp.status < 500
    assert resp.headers["Content-Security-Policy"] == CSP
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_signed_out_pages_redirect_and_the_redirect_is_protected(client: Client) -> None:
    resp = await client.get("/console/accounts/acme/overview", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/console/sign-in?next=/console/accounts/acme/overview"
    assert resp.headers["Content-Security-Policy"] == CSP


async def test_the_cookie_holds_a_random_id_only(client: Client) -> None:
    resp = await client.post("/console/sign-in", data={"key": API_KEY}, allow_redirects=False)
    header = resp.headers["Set-Cookie"]
    assert "HttpOnly" in header
    assert "SameSite=Strict" in header
    assert "Path=/console" in header
    assert "Secure" not in header  # plain HTTP here
    assert API_KEY not in header
    assert API_KEY not in resp.headers["Location"]


async def test_secure_cookie_behind_a_trusted_tls_proxy(make_client: ClientFactory) -> None:
    client = await make_client(server={"trusted_proxies": ["127.0.0.1"]}, metrics={"public": True})
    resp = await client.post(
        "/console/sign-in",
        data={"key": API_KEY},
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
    )
    assert "Secure" in resp.headers["Set-Cookie"]


async def test_a_wrong_key_counts_as_a_failed_authentication(make_client: ClientFactory) -> None:
    client = await make_client(auth={**_auth(), "failed_burst": 2, "failed_per_s": 0.01})
    for _ in range(2):
        resp = await client.post("/console/sign-in", data={"key": "wrong-key-0123456789"})
        assert resp.status == 401
        assert (await resp.json())["code"] == "invalid_api_key"
    resp = await client.post("/console/sign-in", data={"key": "wrong-key-0123456789"})
    assert resp.status == 429
    assert (await resp.json())["code"] == "too_many_failed_authentications"
    # The right key from the same address still works.
    await signed_in(client)


async def test_the_key_s_rate_limit_applies_to_pages(make_client: ClientFactory) -> None:
    auth = _auth()
    auth["keys"][0] = {**auth["keys"][0], "rate_per_s": 0.01, "burst": 3}
    client = await make_client(auth=auth)
    await signed_in(client)  # 1
    statuses = [
        (await client.get("/console/accounts/acme/health", allow_redirects=False)).status
        for _ in range(3)
    ]
    assert statuses == [200, 200, 429]


def _auth() -> dict[str, Any]:
    return {
        "keys": [
            {"name": "admin", "key_env": "CTWA_TEST_KEY", "accounts": ["*"]},
            {"name": "scoped", "key_env": "CTWA_SCOPED_KEY", "accounts": ["other"]},
        ]
    }


async def test_sessions_expire(client: Client) -> None:
    await signed_in(client)
    sessions: Sessions = client.app[CONSOLE].sessions
    assert (await client.get("/console/accounts/acme/health")).status == 200
    real = sessions.clock
    sessions.clock = lambda: real() + sessions.ttl_s + 1
    resp = await client.get("/console/accounts/acme/health", allow_redirects=False)
    assert resp.status == 303
    assert len(sessions) == 0


async def test_a_revoked_key_ends_its_sessions(client: Client) -> None:
    await signed_in(client)
    rotated = {**ENV, "CTWA_TEST_KEY": "a-brand-new-key-0123456789"}
    assert reload_secrets(client.app, rotated)
    resp = await client.get("/console/accounts/acme/health", allow_redirects=False)
    assert resp.status == 303


async def test_state_changes_need_the_token_and_this_site(client: Client) -> None:
    await signed_in(client)
    token = await csrf_of(client)
    url = "/console/accounts/acme/replay"
    resp = await client.post(url, data={"eventIds": "x"})
    assert resp.status == 403
    assert (await resp.json())["code"] == "csrf_token_invalid"
    resp = await client.post(url, data={"eventIds": "x", "csrf": token + "x"})
    assert resp.status == 403
    resp = await client.post(
        url, data={"eventIds": "x", "csrf": token}, headers={"Origin": "https://evil.example"}
    )
    assert (await resp.json())["code"] == "csrf_origin_mismatch"
    resp = await client.post(
        url, data={"eventIds": "x", "csrf": token}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert (await resp.json())["code"] == "csrf_cross_site"
    resp = await client.post(
        "/console/sign-in", data={"key": API_KEY}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert resp.status == 403
    resp = await client.post("/console/sign-out", data={})
    assert resp.status == 403
    ok = await client.post(url, data={"eventIds": "x", "csrf": token}, allow_redirects=False)
    assert ok.status == 303


@pytest.mark.parametrize(
    ("method", "path", "data"),
    [
        (
            "GET",
            "/console/accounts/acme/overview?period=custom&start=2026-02-30&end=2026-03-01",
            None,
        ),
        ("GET", "/console/accounts/acme/ads?sort=nope", None),
        ("GET", "/console/accounts/acme/events?limit=0", None),
        ("GET", "/console/accounts/acme/conversations?q=%2B1", None),
        ("GET", "/console/accounts/acme/replay?status=delivered", None),
        ("POST", "/console/sign-in", b"key=%FF%FE"),
        ("POST", "/console/sign-in", b"key=&key="),
        ("POST", "/console/sign-in", b""),
    ],
)
async def test_bad_input_is_a_4xx_envelope(
    client: Client, method: str, path: str, data: bytes | None
) -> None:
    await signed_in(client)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    resp = await client.request(method, path, data=data, headers=headers)
    assert 400 <= resp.status < 500, await resp.text()
    body = await resp.json()
    assert set(body) == {"error", "type", "code", "param", "details"}


async def test_bad_cookies_are_signed_out_not_errors(client: Client) -> None:
    for value in ("", "x" * 500, "\u00e9", "a;b"):
        client.session.cookie_jar.clear()
        resp = await client.get(
            "/console/accounts/acme/overview",
            headers={"Cookie": f"ctwa_console={value}"},
            allow_redirects=False,
        )
        assert resp.status == 303


async def test_the_console_can_be_switched_off(make_client: ClientFactory) -> None:
    client = await make_client(console={"enabled": False})
    assert (await client.get("/console/sign-in")).status == 404


def test_sessions_are_bounded_and_end_on_sign_out() -> None:
    now = [1000.0]
    sessions = Sessions(ttl_s=60, max_sessions=2, clock=lambda: now[0])
    first = sessions.start(b"k")
    second = sessions.start(b"k")
    third = sessions.start(b"k")
    assert sessions.get(first) is None  # the oldest went first
    assert sessions.get(second) is not None
    sessions.end(second)
    assert sessions.get(second) is None
    now[0] += 61
    assert sessions.get(third) is None


async def test_the_settings_table_decodes(config: dict[str, Any]) -> None:
    settings = parse_settings({**config, "console": {"session_ttl_s": 600}})
    assert settings.console.session_ttl_s == 600
    assert settings.console.enabled
