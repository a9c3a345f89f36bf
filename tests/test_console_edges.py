"""The console at its edges, on the real app: odd event ids (a "/", a ",", control
characters), links people typed into ads, notices and errors that name what to fix, the
account switcher without JavaScript, error pages for browsers; and what a scoped key, a
spreadsheet and the logs never get."""

from __future__ import annotations

import re

import pytest

from tests.conftest import (
    API_KEY,
    AUTH,
    SCOPED_KEY,
    LogCapture,
    add_conversation,
    store_of,
)
from tests.console_http import Client, csrf_of, signed_in
from tests.console_seed import stored_event
from tests.payloads import message, messages_change, notification, post_signed, referral


@pytest.mark.parametrize("event_id", ["a\nb", "a\rb", "a\x00b"])
async def test_a_replay_naming_an_odd_event_id_is_a_400_naming_event_ids(
    client: Client, event_id: str
) -> None:
    """An event id with a control character is refused before anything is replayed."""
    await signed_in(client)
    resp = await client.post(
        "/console/accounts/acme/replay",
        data={"csrf": csrf_of(client), "eventIds": event_id},
        allow_redirects=False,
    )
    assert resp.status == 400
    assert (await resp.json())["param"] == "eventIds"


@pytest.mark.parametrize("field", ["eventName", "adId"])
async def test_a_replay_filter_with_a_nul_is_a_400_naming_it(client: Client, field: str) -> None:
    # Found by review: on PostgreSQL a NUL reached the query and came back as a 400 naming no
    # field (on SQLite, a replay of nothing).
    resp = await client.post(
        "/v1/whatsapp/replay", json={"accountId": "acme", field: "Pur\x00chase"}, headers=AUTH
    )
    assert resp.status == 400
    assert (await resp.json())["param"] == field


async def test_an_event_id_with_a_slash_opens_from_every_list(client: Client) -> None:
    """Event links quote the id whole ("/" too), so every list's link opens the event."""
    conversation = await add_conversation(store_of(client))
    resp = await client.post(
        "/v1/whatsapp/conversions",
        json={"accountId": "acme", "eventName": "Purchase", "eventId": "2026/11/0042",
              "conversationId": conversation.id, "value": 5, "currency": "USD"},
        headers=AUTH,
    )  # fmt: skip
    assert resp.status == 200, await resp.text()
    await signed_in(client)
    for page in ("events", f"conversations?q={conversation.id}"):
        html = await (await client.get(f"/console/accounts/acme/{page}")).text()
        (link,) = re.findall(r'href="(/console/accounts/acme/events/[^"]+)"', html)
        assert link == "/console/accounts/acme/events/2026%2F11%2F0042"
        opened = await client.get(link, allow_redirects=False)
        assert opened.status == 200, (page, link, await opened.text())


async def test_replay_of_one_event_goes_back_to_that_event(client: Client) -> None:
    """After replaying one event, the browser goes back to that event's page."""
    await signed_in(client)
    resp = await client.post(
        "/console/accounts/acme/replay",
        data={"csrf": csrf_of(client), "eventIds": "2026/11/0042"},
        allow_redirects=False,
    )
    assert resp.status == 303
    location = resp.headers["Location"]
    assert location == "/console/accounts/acme/events/2026%2F11%2F0042?replayed=0"


async def test_replaying_an_event_whose_id_has_a_comma_replays_that_event(
    seeded: Client,
) -> None:
    """Event ids travel one field each (never comma-joined), so an id with a comma replays."""
    store = store_of(seeded)
    a1 = await store.get_conversation("acme", "conv_seed_a1")
    assert a1 is not None
    await store.insert_event(
        stored_event(a1, "order-77,2", "Purchase", "failed", a1.created_at + 60, 1.0, "USD")
    )
    await signed_in(seeded)
    html = await (await seeded.get("/console/accounts/acme/events/order-77%2C2")).text()
    (link,) = re.findall(r'id="replay" href="([^"]+)"', html)
    confirm = await (await seeded.get(link.replace("&amp;", "&"))).text()
    assert "This will re-queue <strong>1</strong> event" in confirm, confirm
    form = confirm[confirm.index('action="/console/accounts/acme/replay"') :]
    form = form[: form.index("</form>")]
    fields = re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', form)
    assert ("eventIds", "order-77,2") in fields
    resp = await seeded.post("/console/accounts/acme/replay", data=fields, allow_redirects=False)
    assert resp.headers["Location"].endswith("/events/order-77%2C2?replayed=1")


async def test_ad_links_are_never_javascript_urls(client: Client) -> None:
    """Only http(s) ad links are links; anything else is shown as text."""
    ref = referral("Aff-clid-javascript-0123456789")
    ref["source_url"] = "javascript:alert(document.domain)"
    await post_signed(
        client, notification(messages_change([message("16505550001", "wamid.JS", ref=ref)]))
    )
    await signed_in(client)
    for page in ("ads", "conversations"):
        html = await (await client.get(f"/console/accounts/acme/{page}")).text()
        assert 'href="javascript:' not in html, page
        assert "javascript:alert(document.domain)" in html, page


async def test_the_replayed_notice_on_an_event_page_is_a_number(seeded: Client) -> None:
    """`replayed` on an event page is a count: any other text is a 400, never shown."""
    await signed_in(seeded)
    resp = await seeded.get(
        "/console/accounts/acme/events/order-a1-2",
        params={"replayed": "9 events. Your API key leaked: call +1 555 0100"},
    )
    assert resp.status == 400
    assert "Your API key leaked" not in await resp.text()
    html = await (await seeded.get("/console/accounts/acme/events/order-a1-2?replayed=1")).text()
    assert "Re-queued 1 event." in html


@pytest.mark.parametrize(
    ("start", "end", "param"),
    [("2026-11-20", "2026-11-10", "end"), ("2024-01-01", "2026-01-01", "start")],
)
async def test_a_custom_period_error_names_the_form_s_fields(
    client: Client, start: str, end: str, param: str
) -> None:
    """A custom period's errors name the form's `start` and `end`, not the API's since/until."""
    await signed_in(client)
    resp = await client.get(
        "/console/accounts/acme/overview",
        params={"period": "custom", "start": start, "end": end},
    )
    assert resp.status == 400
    assert (await resp.json())["param"] == param


async def test_a_console_replay_error_names_its_field(client: Client) -> None:
    """A replay's bad status is a 400 naming `status`."""
    await signed_in(client)
    resp = await client.post(
        "/console/accounts/acme/replay", data={"csrf": csrf_of(client), "status": "delivered"}
    )
    assert resp.status == 400
    assert (await resp.json())["param"] == "status"


async def test_a_browser_gets_an_error_page_and_a_client_the_envelope(client: Client) -> None:
    """A page load (Accept: text/html) that is refused gets the message on a page with the
    same status; any other client keeps the envelope."""
    await signed_in(client)
    url = "/console/accounts/acme/overview?period=custom&start=2026-11-20&end=2026-11-10"
    resp = await client.get(url, headers={"Accept": "text/html,application/xhtml+xml,*/*"})
    assert resp.status == 400
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert "`end` date (To) is before its `start` date (From)" in html
    assert 'href="/console/accounts/acme/overview"' in html  # the page, without the choices
    resp = await client.get(url)
    assert resp.content_type == "application/json"
    assert (await resp.json())["code"] == "invalid_field"


async def test_the_account_switcher_is_a_form_that_keeps_the_page(client: Client) -> None:
    """The switcher submits (no navigation on a key press): /console/?account=&page= goes
    to that page of that account; another key's account is refused."""
    await signed_in(client)
    html = await (await client.get("/console/accounts/acme/events")).text()
    switcher = html[html.index('id="account-switch"') : html.index("</form>")]
    assert "data-navigate" not in switcher
    assert '<input type="hidden" name="page" value="events">' in switcher
    assert '<button type="submit">Switch</button>' in switcher
    resp = await client.get("/console/?account=other&page=events", allow_redirects=False)
    assert resp.headers["Location"] == "/console/accounts/other/events"
    client.session.cookie_jar.clear()
    await signed_in(client, SCOPED_KEY)
    resp = await client.get("/console/?account=acme&page=events", allow_redirects=False)
    assert resp.status == 403
    resp = await client.get("/console/?account=other&page=nope", allow_redirects=False)
    assert (resp.status, (await resp.json())["param"]) == (400, "page")


async def test_pages_ask_for_no_favicon(client: Client) -> None:
    """Pages name an inline icon, so the browser asks for no /favicon.ico (a 404 outside
    the console's CSP)."""
    html = await (await client.get("/console/sign-in")).text()
    assert '<link rel="icon" href="data:,">' in html


async def test_a_scoped_key_cannot_replay_or_read_another_account(seeded: Client) -> None:
    """A key scoped to `other` neither replays nor sees acme's events, by either path."""
    await signed_in(seeded, SCOPED_KEY)
    token = csrf_of(seeded)
    # acme's failed event, through the scoped key's own account path and through acme's.
    own = await seeded.post(
        "/console/accounts/other/replay",
        data={"csrf": token, "eventIds": "order-a1-2"},
        allow_redirects=False,
    )
    assert own.status == 303
    assert own.headers["Location"].endswith("replayed=0")
    theirs = await seeded.post(
        "/console/accounts/acme/replay", data={"csrf": token, "eventIds": "order-a1-2"}
    )
    assert theirs.status == 403
    detail = await (
        await seeded.get("/v1/whatsapp/conversions/order-a1-2?accountId=acme", headers=AUTH)
    ).json()
    assert detail["status"] == "failed"
    assert (await seeded.get("/console/accounts/other/events/order-a1-1")).status == 404
    for q in ("conv_seed_a1", "+16505551000"):
        resp = await seeded.get("/console/accounts/other/conversations", params={"q": q})
        html = await resp.text()
        assert "No conversation found" in html
        assert "order-a1" not in html
    for page in ("overview", "ads", "ads.csv", "events", "events/order-a1-1", "health",
                 "conversations", "replay"):  # fmt: skip
        resp = await seeded.get(f"/console/accounts/acme/{page}", allow_redirects=False)
        assert resp.status == 403, page


async def test_csv_cells_cannot_run_as_formulas(client: Client) -> None:
    """CSV cells an ad's author wrote that start like a formula are quoted."""
    ref = referral("Aff-clid-formula-0123456789", source_id="-2+3")
    ref["headline"] = '=HYPERLINK("http://evil.example","x")'
    await post_signed(
        client, notification(messages_change([message("16505550002", "wamid.F", ref=ref)]))
    )
    await signed_in(client)
    text = await (await client.get("/console/accounts/acme/ads.csv")).text()
    row = text.splitlines()[1]
    assert row.startswith("'-2+3,\"'=HYPERLINK(")


@pytest.mark.parametrize(
    "next_",
    ["//evil.example", "https://evil.example", "/console//evil.example", "/console/\\evil",
     "/console/@evil.example", "javascript:alert(1)", "/console/../../metrics",
     "/console/%2e%2e/metrics", "/console/accounts/./../../healthz"],
)  # fmt: skip
async def test_sign_in_never_redirects_off_site(client: Client, next_: str) -> None:
    """`next` is followed only to a console path of this site."""
    resp = await client.post(
        "/console/sign-in", data={"key": API_KEY, "next": next_}, allow_redirects=False
    )
    assert resp.headers["Location"] == "/console/"


async def test_console_searches_leave_no_phone_or_key_in_logs(
    client: Client, logs: LogCapture
) -> None:
    """Searching by phone or BSUID, and a wrong key, leave neither in the logs."""
    await add_conversation(store_of(client), wa_id="16505557766", bsuid="US.13491208655302741918")
    await signed_in(client)
    for q in ("+1 650 555 7766", "US.13491208655302741918", "conv_nothing"):
        assert (
            await client.get("/console/accounts/acme/conversations", params={"q": q})
        ).status == 200
    await client.post("/console/sign-in", data={"key": "wrong-key-0123456789-secret"})
    for secret in (API_KEY, "wrong-key-0123456789-secret", "6505557766", "13491208655302741918"):
        assert secret not in logs.text


async def test_a_console_requests_line_names_the_key_it_signed_in_with(
    client: Client, logs: LogCapture
) -> None:
    """The key's name from the config, never the key: an operator can tell who browsed."""
    await signed_in(client)
    assert (await client.get("/console/")).status in (200, 303)
    line = logs.events("request")[-1]
    assert line["key_name"] == "admin"
    assert API_KEY not in logs.text
