"""Console sessions: when they end (expiry, revocation, sign-out, signing in again) and how
they are bounded, so that no key's holder can end the sessions of another key."""

from __future__ import annotations

from gateway.console.guard import CONSOLE
from gateway.console.sessions import Sessions
from gateway.http.app import reload_secrets
from tests.conftest import ENV, SCOPED_KEY, ClientFactory
from tests.console_http import Client, page_status, signed_in


async def test_sessions_expire(client: Client) -> None:
    """A session ends session_ttl_s after sign-in: the page goes back to sign-in."""
    await signed_in(client)
    sessions: Sessions = client.app[CONSOLE].sessions
    assert (await client.get("/console/accounts/acme/health")).status == 200
    real = sessions.clock
    sessions.clock = lambda: real() + sessions.ttl_s + 1
    resp = await client.get("/console/accounts/acme/health", allow_redirects=False)
    assert resp.status == 303
    assert len(sessions) == 0


async def test_a_revoked_key_ends_its_sessions(client: Client) -> None:
    """A key rotated on SIGHUP ends the sessions signed in with it."""
    await signed_in(client)
    rotated = {**ENV, "CTWA_TEST_KEY": "a-brand-new-key-0123456789"}
    assert reload_secrets(client.app, rotated)
    resp = await client.get("/console/accounts/acme/health", allow_redirects=False)
    assert resp.status == 303


async def test_signing_in_again_ends_the_browser_s_previous_session(client: Client) -> None:
    """A browser that signs in again (with any key) leaves no session behind."""
    first = await signed_in(client)
    second = await signed_in(client, SCOPED_KEY)
    assert first != second
    assert len(client.app[CONSOLE].sessions) == 1
    assert await page_status(client, first) == 303


async def test_a_scoped_key_cannot_end_everyone_else_s_sessions(
    make_client: ClientFactory,
) -> None:
    """Signing in again and again with one key, from fresh browsers, past max_sessions
    ends that key's own sessions, never another key's."""
    client = await make_client(console={"max_sessions": 3})
    admin = await signed_in(client)
    for _ in range(3):
        client.session.cookie_jar.clear()  # another browser each time
        await signed_in(client, SCOPED_KEY)
    assert await page_status(client, admin) == 200


def test_sessions_are_bounded_and_end_on_sign_out() -> None:
    """Past max_sessions the oldest ends; sign-out and expiry end one."""
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
    assert len(sessions) == 0


def test_a_key_past_its_cap_loses_its_own_oldest_session() -> None:
    """Past max_per_key a key's own oldest session ends; past max_sessions, the oldest of
    the key holding the most, so a key with few keeps them."""
    sessions = Sessions(ttl_s=60, max_sessions=5, max_per_key=2)
    admin = sessions.start(b"admin")
    mine = [sessions.start(b"scoped") for _ in range(3)]
    assert sessions.get(mine[0]) is None
    assert all(sessions.get(s) is not None for s in (admin, *mine[1:]))
    others = [sessions.start(key) for key in (b"a", b"b", b"c")]
    # Six sessions for five places: "scoped" holds the most and gives up its oldest.
    assert sessions.get(mine[1]) is None
    assert all(sessions.get(s) is not None for s in (admin, mine[2], *others))
    assert len(sessions) == 5
