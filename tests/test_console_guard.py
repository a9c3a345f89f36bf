"""The console's safety nets at the HTTP level: CSP and headers on every answer, cookie
flags, sign-in behind a reverse proxy, failed sign-ins counted, CSRF and origin checks, bad
input (forms, headers, queries) answered 4xx in the envelope, and the switch that turns the
console off."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.config import parse_settings
from gateway.console.guard import CSP
from tests.conftest import API_KEY, ClientFactory
from tests.console_http import FORM, Client, csrf_of, page_status, signed_in

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("method", "path", "data", "headers"),
    [
        ("GET", "/console/sign-in", None, {}),
        ("GET", "/console/static/console.js", None, {}),
        ("GET", "/console/accounts/acme/overview", None, {}),
        ("GET", "/console/accounts/nobody/overview", None, {}),
        ("GET", "/console/accounts/acme/events/missing", None, {}),
        ("GET", "/console/accounts/acme/overview?period=fortnight", None, {}),
        # Answers made outside the console's handlers: the router's 404 and 405.
        ("GET", "/console/static/missing.js", None, {}),
        ("GET", "/console/no-such-page", None, {}),
        ("DELETE", "/console/accounts/acme/overview", None, {}),
        # Sign-in refusals: a wrong key, not a form, another site.
        ("POST", "/console/sign-in", b"key=wrong-key-0123456789", FORM),
        ("POST", "/console/sign-in", b"key=x", {"Content-Type": "text/plain"}),
        ("POST", "/console/sign-in", b"key=x", {**FORM, "Sec-Fetch-Site": "cross-site"}),
    ],
)
async def test_every_console_answer_carries_the_csp(
    client: Client, method: str, path: str, data: bytes | None, headers: dict[str, str]
) -> None:
    """Every answer under /console, a page or a refusal from anywhere, has the CSP and the
    other security headers."""
    await signed_in(client)
    resp = await client.request(method, path, data=data, headers=headers, allow_redirects=False)
    assert resp.status < 500
    assert resp.headers["Content-Security-Policy"] == CSP
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_too_many_failed_sign_ins_are_refused_with_the_csp(
    make_client: ClientFactory,
) -> None:
    """The 429 the failed-authentication limit answers in place of a sign-in's 401 has the
    CSP too."""
    client = await make_client(auth={**_auth(), "failed_burst": 1, "failed_per_s": 0.01})
    for status in (401, 429):
        resp = await client.post("/console/sign-in", data={"key": "wrong-key-0123456789"})
        assert resp.status == status
        assert resp.headers["Content-Security-Policy"] == CSP


async def test_signed_out_pages_redirect_and_the_redirect_is_protected(client: Client) -> None:
    """A signed-out page load goes to sign-in, naming the page to come back to."""
    resp = await client.get("/console/accounts/acme/overview", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/console/sign-in?next=/console/accounts/acme/overview"
    assert resp.headers["Content-Security-Policy"] == CSP


async def test_a_deep_link_keeps_its_whole_query_through_sign_in(client: Client) -> None:
    """`next` carries the page's whole query (its "&" escaped), and sign-in returns there."""
    wanted = "/console/accounts/acme/events?status=failed&eventName=Purchase"
    resp = await client.get(wanted, allow_redirects=False)
    (next_,) = parse_qs(urlsplit(resp.headers["Location"]).query)["next"]
    assert next_ == wanted
    resp = await client.post(
        "/console/sign-in", data={"key": API_KEY, "next": next_}, allow_redirects=False
    )
    assert resp.headers["Location"] == wanted


async def test_the_cookie_holds_a_random_id_only(client: Client) -> None:
    """The cookie is HttpOnly, SameSite=Strict, scoped to /console, and holds no key."""
    resp = await client.post("/console/sign-in", data={"key": API_KEY}, allow_redirects=False)
    header = resp.headers["Set-Cookie"]
    assert "HttpOnly" in header
    assert "SameSite=Strict" in header
    assert "Path=/console" in header
    assert "Secure" not in header  # plain HTTP here
    assert API_KEY not in header
    assert API_KEY not in resp.headers["Location"]


def _readme_nginx() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"```nginx\n(.*?)```", readme, re.S)
    assert found is not None
    return found.group(1)


def _through_readme_proxy(browser: dict[str, str]) -> dict[str, str]:
    """The headers a request has once the README's nginx block passed it on (nginx sends
    ``Host: $proxy_host`` unless the block sets Host; a header is set only if the block sets
    it)."""
    block = _readme_nginx()
    proxy_pass = re.search(r"proxy_pass http://([^;/]+)", block)
    assert proxy_pass is not None
    values = {
        "$host": "ctwa.example.com",
        "$http_host": "ctwa.example.com",
        "$scheme": "https",
        "$proxy_add_x_forwarded_for": "203.0.113.7",
        "$remote_addr": "203.0.113.7",
        "$request_id": "0123456789abcdef0123456789abcdef",
    }
    headers = {**browser, "Host": proxy_pass.group(1)}
    for name, value in re.findall(r"proxy_set_header\s+(\S+)\s+(\S+);", block):
        headers[name] = values.get(value, value)
    return headers


# What Chromium sends with the sign-in form's fetch on https://ctwa.example.com/console/.
CHROMIUM = {"Origin": "https://ctwa.example.com", "Sec-Fetch-Site": "same-origin", **FORM}
# What a browser without Fetch Metadata (older Safari) sends: the Origin only.
NO_FETCH_METADATA = {"Origin": "https://ctwa.example.com", **FORM}


@pytest.mark.parametrize("browser", [CHROMIUM, NO_FETCH_METADATA])
async def test_sign_in_works_behind_the_reverse_proxy_the_readme_shows(
    make_client: ClientFactory, browser: dict[str, str]
) -> None:
    """Behind the README's nginx block (a trusted proxy), sign-in is accepted and the
    cookie is Secure."""
    client = await make_client(server={"trusted_proxies": ["127.0.0.1"]}, metrics={"public": True})
    resp = await client.post(
        "/console/sign-in",
        data=f"key={API_KEY}",
        headers=_through_readme_proxy(browser),
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    assert "Secure" in resp.headers["Set-Cookie"]


async def test_a_trusted_proxy_s_forwarded_host_counts(make_client: ClientFactory) -> None:
    """A proxy that keeps its own Host but sends X-Forwarded-Host (and is trusted) works."""
    client = await make_client(server={"trusted_proxies": ["127.0.0.1"]}, metrics={"public": True})
    headers = {**NO_FETCH_METADATA, "Host": "127.0.0.1:8080"}
    resp = await client.post(
        "/console/sign-in",
        data=f"key={API_KEY}",
        headers={**headers, "X-Forwarded-Host": "ctwa.example.com"},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()


async def test_forwarded_headers_from_an_untrusted_peer_are_ignored(client: Client) -> None:
    """Without [server] trusted_proxies, X-Forwarded-Host cannot make another site's Origin
    pass, nor X-Forwarded-Proto make the cookie Secure."""
    forged = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https", **FORM}
    resp = await client.post(
        "/console/sign-in",
        data=f"key={API_KEY}",
        headers={**forged, "Origin": "https://evil.example"},
    )
    assert resp.status == 403
    assert (await resp.json())["code"] == "csrf_origin_mismatch"
    resp = await client.post(
        "/console/sign-in", data=f"key={API_KEY}", headers=forged, allow_redirects=False
    )
    assert resp.status == 303
    assert "Secure" not in resp.headers["Set-Cookie"]


async def test_a_wrong_key_counts_as_a_failed_authentication(make_client: ClientFactory) -> None:
    """A wrong key at sign-in is a failed authentication: 401, then 429 past the limit."""
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
    """Each page counts against the signed-in key's rate limit."""
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


async def test_state_changes_need_the_token_and_this_site(client: Client) -> None:
    """Sign-out and replay need the session's CSRF token and this site's Origin."""
    await signed_in(client)
    token = csrf_of(client)
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
    """Bad dates, sorts, limits, phones, statuses and forms are 4xx envelopes."""
    await signed_in(client)
    resp = await client.request(method, path, data=data, headers=FORM)
    assert 400 <= resp.status < 500, await resp.text()
    body = await resp.json()
    assert set(body) == {"error", "type", "code", "param", "details"}


@pytest.mark.parametrize("path", ["/console/sign-in", "/console/sign-out"])
async def test_a_form_in_another_charset_is_a_415_naming_the_header(
    client: Client, path: str
) -> None:
    """A form declared in a charset that is not UTF-8 (even an unknown one) is a 415."""
    await signed_in(client)
    resp = await client.post(
        path,
        data=b"key=abc&csrf=x",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=nonsense-xx"},
    )
    assert resp.status == 415, await resp.text()
    body = await resp.json()
    assert (body["code"], body["param"]) == ("unsupported_charset", "Content-Type")


@pytest.mark.parametrize("origin", ["http://[::1", "http://[zz]", "null"])
@pytest.mark.parametrize("path", ["/console/sign-in", "/console/accounts/acme/replay"])
async def test_a_malformed_origin_is_refused_not_a_500(
    client: Client, path: str, origin: str
) -> None:
    """An Origin that is no URL is a mismatch (403 naming the header), never a 500."""
    await signed_in(client)
    resp = await client.post(
        path, data={"key": "wrong-key-0123456789", "csrf": csrf_of(client)},
        headers={"Origin": origin},
    )  # fmt: skip
    assert resp.status == 403, await resp.text()
    body = await resp.json()
    assert (body["code"], body["param"]) == ("csrf_origin_mismatch", "Origin")


async def test_a_sec_fetch_site_that_is_not_utf8_is_refused_in_the_envelope(
    client: Client,
) -> None:
    """Raw non-UTF-8 bytes in Sec-Fetch-Site are a 403 envelope that does not echo them."""
    # Raw bytes: aiohttp's client would encode the header as UTF-8; any client can send these.
    assert client.server.host is not None
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    body = b"key=wrong-key-0123456789"
    writer.write(
        b"POST /console/sign-in HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Sec-Fetch-Site: \xff\xfe\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    answer = await reader.read()
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403"), head
    assert b'"code":"csrf_cross_site"' in payload
    assert b'"param":"Sec-Fetch-Site"' in payload
    assert b"\xff" not in payload


async def test_a_chunked_form_is_held_to_the_form_limit(client: Client) -> None:
    """A form without a Content-Length is cut off at 64 KiB while it is read: 413."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"key="
        for _ in range(40):
            yield b"a" * 4096  # 160 KiB

    resp = await client.post("/console/sign-in", data=chunks(), headers=FORM)
    assert resp.status == 413
    assert (await resp.json())["details"] == {"maxBodyBytes": 64 * 1024}


async def test_bad_cookies_are_signed_out_not_errors(client: Client) -> None:
    """An empty, long, non-ASCII or odd cookie is a signed-out browser, not an error."""
    for value in ("", "x" * 500, "\u00e9", "a;b"):
        assert await page_status(client, value, "/console/accounts/acme/overview") == 303


async def test_the_console_can_be_switched_off(make_client: ClientFactory) -> None:
    """[console] enabled = false serves no /console routes."""
    client = await make_client(console={"enabled": False})
    assert (await client.get("/console/sign-in")).status == 404


async def test_the_settings_table_decodes(config: dict[str, Any]) -> None:
    """The [console] table decodes, with its defaults."""
    settings = parse_settings({**config, "console": {"session_ttl_s": 600}})
    assert settings.console.session_ttl_s == 600
    assert settings.console.enabled
    assert settings.console.max_sessions_per_key == 20
