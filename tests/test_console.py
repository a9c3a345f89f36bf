"""The console in a real browser (Debian's Chromium through Playwright) on the real app and a
real SQLite store seeded with known numbers; and its safety nets at the HTTP level."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Page, expect

from gateway.config import parse_settings
from gateway.http.app import create_app
from gateway.http.keys import PIPELINE
from gateway.plugin_manager import build_plugins
from tests.browser import chromium
from tests.conftest import API_KEY, ENV, SCOPED_KEY
from tests.console_seed import seed

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

# README screenshots: CTWA_SCREENSHOTS=docs scripts/dev test tests/test_console.py -k overview
SHOTS = os.environ.get("CTWA_SCREENSHOTS")


@pytest.fixture
async def server(aiohttp_server: Any, config: dict[str, Any]) -> TestServer:
    # meta_capi at an address nothing listens on: a replayed event stays pending.
    plugins = {"sinks": ["meta_capi"], "meta_capi": {"graph_url": "http://127.0.0.1:9"}}
    settings = parse_settings({**config, "plugins": plugins})
    app = create_app(settings, build_plugins(settings), environ=ENV)
    started: TestServer = await aiohttp_server(app)
    await seed(app[PIPELINE].store)
    return started


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


class Console:
    """A browser tab on the console, recording what the CSP blocked."""

    def __init__(self, page: Page, base: str) -> None:
        self.page = page
        self.base = base
        self.violations: list[str] = []
        page.on(
            "console",
            lambda m: (
                self.violations.append(m.text) if "Content Security Policy" in m.text else None
            ),
        )

    async def sign_in(self, key: str = API_KEY) -> None:
        page = self.page
        await page.goto(f"{self.base}/console/")
        await expect(page).to_have_url(f"{self.base}/console/sign-in?next=/console/")
        # Keyboard only: tab to the key field, type, Enter.
        seen = []
        for _ in range(6):
            await page.keyboard.press("Tab")
            seen.append(await page.evaluate("document.activeElement.outerHTML.slice(0, 60)"))
            if await page.evaluate("document.activeElement.id") == "key":
                break
        assert await page.evaluate("document.activeElement.id") == "key", seen
        await page.keyboard.type(key)
        await page.keyboard.press("Enter")
        await page.wait_for_url("**/overview")

    async def shot(self, tmp: Path, name: str) -> None:
        folder = Path(SHOTS) if SHOTS else tmp
        folder.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(folder / f"console-{name}.png"), full_page=True)
        assert (folder / f"console-{name}.png").stat().st_size > 10_000


@pytest.fixture
async def console(browser: Browser, server: TestServer) -> Console:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    return Console(page, str(server.make_url("")).rstrip("/"))


async def stat(page: Page, name: str) -> str:
    return (await page.locator(f'[data-stat="{name}"]').inner_text()).strip()


async def test_sign_in_then_overview_and_funnel_show_the_seeded_numbers(
    console: Console, tmp_path: Path
) -> None:
    await console.sign_in()
    page = console.page
    assert page.url.endswith("/console/accounts/acme/overview")
    assert await stat(page, "clicks") == "4"
    assert await stat(page, "conversations") == "5"
    assert await stat(page, "events") == "5"
    assert await stat(page, "delivered") == "2"
    assert await stat(page, "failed") == "1"
    assert await stat(page, "pending") == "1"
    assert await stat(page, "expired") == "1"
    assert await stat(page, "dry_run") == "0"
    assert await stat(page, "within-window") == "80.0%"
    value = await stat(page, "value")
    assert "USD 65.00" in value
    assert "EUR 25.50" in value
    # The chart drew (its script ran under the CSP), and is labelled for screen readers.
    await expect(page.locator("#chart canvas")).to_have_count(1)
    assert "conversions by status" in (
        await page.locator("#chart").get_attribute("aria-label") or ""
    )
    await console.shot(tmp_path, "overview")

    await page.get_by_role("link", name="Ads").click()
    await page.wait_for_url("**/ads")
    row = page.locator('tr[data-ad="120000000000000001"]')
    assert await row.locator('[data-col="clicks"]').inner_text() == "2"
    assert await row.locator('[data-col="conversations"]').inner_text() == "2"
    assert (await row.locator('[data-col="conversions"]').inner_text()).startswith("3")
    assert await row.locator('[data-col="value"]').inner_text() == "USD 50.00"
    assert await row.locator('[data-col="rate"]').inner_text() == "100.0%"
    assert await row.locator('[data-col="time"]').inner_text() == "2.0 h"
    assert "Summer sale" in await row.inner_text()
    # Sorted by conversions, most first: Summer sale (3) leads.
    first = page.locator("#ads tbody tr").first
    assert await first.get_attribute("data-ad") == "120000000000000001"
    await page.get_by_role("link", name="Clicks").click()
    await expect(page.locator('th[aria-sort="descending"]')).to_contain_text("Clicks")
    await console.shot(tmp_path, "funnel")
    csv = await page.request.get(f"{console.base}/console/accounts/acme/ads.csv?sort=conversions")
    assert csv.status == 200
    lines = (await csv.text()).splitlines()
    assert lines[0].startswith("ad_id,headline,source_url,clicks,conversations,converted")
    assert lines[1].startswith("120000000000000001,Summer sale,https://fb.me/summer,2,2,2,1.0,3,")
    assert console.violations == []


async def test_open_a_failed_event_and_replay_it(console: Console, tmp_path: Path) -> None:
    await console.sign_in()
    page = console.page
    await page.get_by_role("link", name="Events").click()
    await page.select_option("#status", "failed")
    await page.get_by_role("button", name="Filter").click()
    await page.get_by_role("link", name="order-a1-2").click()
    await expect(page.locator("#event-status")).to_have_text("failed")
    assert "token expired" in await page.locator("#deliveries").inner_text()
    assert '"ctwa_clid"' in await page.locator(".payload").inner_text()
    await page.locator("#replay").click()
    await expect(page.locator("#replay-count")).to_contain_text("re-queue 1 event")
    await page.locator("#confirm-replay").click()
    await page.wait_for_url("**/events/order-a1-2?replayed=1")
    await expect(page.get_by_role("status")).to_contain_text("Re-queued 1 event")
    await expect(page.locator("#event-status")).to_have_text("pending")
    await console.shot(tmp_path, "replayed")
    assert console.violations == []


async def test_a_scoped_key_cannot_see_another_account(console: Console) -> None:
    await console.sign_in(SCOPED_KEY)
    page = console.page
    assert page.url.endswith("/console/accounts/other/overview")
    assert await stat(page, "events") == "1"
    for path in (
        "/console/accounts/acme/overview",
        "/console/accounts/acme/ads.csv",
        "/console/accounts/acme/events/order-a1-1",
        "/console/accounts/acme/conversations?q=conv_seed_a1",
    ):
        response = await page.request.get(console.base + path)
        assert response.status == 403, path
        assert (await response.json())["code"] == "account_not_allowed"
    # Nor through its own account's pages: acme's conversation is not found on "other".
    await page.goto(f"{console.base}/console/accounts/other/conversations?q=conv_seed_a1")
    assert "No conversation found" in await page.locator("main").inner_text()
    # The JSON API answers the key the same way.
    response = await page.request.get(
        f"{console.base}/v1/whatsapp/stats?accountId=acme",
        headers={"Authorization": f"Bearer {SCOPED_KEY}"},
    )
    assert response.status == 403


async def test_sign_out_ends_the_session(console: Console, server: TestServer) -> None:
    await console.sign_in()
    page = console.page
    cookies = await page.context.cookies()
    (session,) = [c for c in cookies if c["name"] == "ctwa_console"]
    assert session["httpOnly"]
    assert session["sameSite"] == "Strict"
    assert API_KEY not in session["value"]
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url("**/sign-in")
    assert [c for c in await page.context.cookies() if c["name"] == "ctwa_console"] == []
    # The old cookie, replayed by hand, opens nothing any more.
    old = {"Cookie": f"ctwa_console={session['value']}"}
    response = await page.request.get(
        f"{console.base}/console/accounts/acme/overview", headers=old, max_redirects=0
    )
    assert response.status == 303
    assert "/console/sign-in" in response.headers["location"]
    response = await page.request.post(
        f"{console.base}/console/accounts/acme/replay", headers=old, form={"eventIds": "x"}
    )
    assert response.status == 401


async def test_a_post_without_the_csrf_token_is_refused(console: Console) -> None:
    await console.sign_in()
    page = console.page
    url = f"{console.base}/console/accounts/acme/replay"
    response = await page.request.post(url, form={"eventIds": "order-a1-2"})
    assert response.status == 403
    body = await response.json()
    assert (body["code"], body["param"]) == ("csrf_token_invalid", "csrf")
    # From the page itself, as a script would (same origin, cookie sent): still refused.
    status = await page.evaluate(
        """url => fetch(url, {method: "POST", credentials: "same-origin",
            body: new URLSearchParams({eventIds: "order-a1-2", csrf: "guess"})})
            .then(r => r.status)""",
        url,
    )
    assert status == 403
    await page.goto(f"{console.base}/console/accounts/acme/events/order-a1-2")
    await expect(page.locator("#event-status")).to_have_text("failed")


async def test_every_page_fits_360_pixels(browser: Browser, server: TestServer) -> None:
    page = await browser.new_page(viewport={"width": 360, "height": 740})
    console = Console(page, str(server.make_url("")).rstrip("/"))
    await console.sign_in()
    for name in (
        "overview",
        "ads",
        "events",
        "events/order-a1-2",
        "conversations",
        "health",
        "replay?status=failed",
    ):
        await page.goto(f"{console.base}/console/accounts/acme/{name}")
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 360, (name, width)
    await page.goto(f"{console.base}/console/sign-in")
    assert await page.evaluate("document.documentElement.scrollWidth") <= 360
    assert console.violations == []


async def test_the_account_switcher_moves_only_when_asked(console: Console) -> None:
    """Arrowing through the accounts goes nowhere; Switch opens the same page of the chosen
    account (a plain form: no script needed)."""
    await console.sign_in()
    page = console.page
    await page.goto(f"{console.base}/console/accounts/acme/events")
    await page.locator("#account-select").focus()
    await page.keyboard.press("ArrowDown")
    assert page.url.endswith("/console/accounts/acme/events")
    await page.get_by_role("button", name="Switch").click()
    await page.wait_for_url("**/console/accounts/other/events")
    assert console.violations == []
