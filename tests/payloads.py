"""Builders for Meta's webhook payloads, shaped like the documented examples in fixtures/."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.http.signature import sign
from tests.conftest import APP_SECRET, PHONE_NUMBER_ID, WABA_ID

FIXTURES = Path(__file__).parent / "fixtures"
# The identifiers of the BSUID fixtures (a user with a username, her parent BSUID, her click).
SHEENA = "US.13491208655302741918"
SHEENA_PARENT = "US.ENT.11815799212886844830"
BSUID_CLID = (
    "Aff-BSUIDn8ZTODiE79d22KtAwQKj9e_mIEOOj27vDVwFjN80dp4_0NiNhEgpGo0AHemvuSoifXaytfTzcchptiErTK"
    "CqTrJ5nW1h7IHYeYymGb5K5J5iTROp"
)


def fixture(name: str) -> bytes:
    """Return a documented payload exactly as Meta publishes it."""
    return (FIXTURES / name).read_bytes()


def signed(body: bytes, secret: str = APP_SECRET) -> dict[str, str]:
    """Return the headers Meta sends with ``body``."""
    return {"X-Hub-Signature-256": sign(secret.encode(), body), "Content-Type": "application/json"}


def referral(
    clid: str | None, *, source_id: str = "120226305854810726", media: str = "image"
) -> dict[str, Any]:
    ref: dict[str, Any] = {
        "source_url": "https://fb.me/3cr4Wqqkv",
        "source_id": source_id,
        "source_type": "ad",
        "body": "Summer Succulents are here!",
        "headline": "Chat with us",
        "media_type": media,
        f"{media}_url": f"https://scontent.xx.fbcdn.net/v/t45.{media}",
        "welcome_message": {"text": "Hi there! Let us know how we can help!"},
    }
    if media == "video":
        ref["thumbnail_url"] = "https://scontent.xx.fbcdn.net/v/t45.thumb"
    if clid is not None:
        ref["ctwa_clid"] = clid
    return ref


def message(
    wa_id: str | None,
    wamid: str,
    *,
    ts: float | None = None,
    ref: dict[str, Any] | None = None,
    text: str = "Can I get more info about this?",
    bsuid: str | None = None,
    parent: str | None = None,
) -> dict[str, Any]:
    """Return an inbound text message from a phone, a BSUID (``wa_id=None``), or both."""
    msg: dict[str, Any] = {
        "id": wamid,
        "timestamp": str(int(time.time() if ts is None else ts)),
        "text": {"body": text},
        "type": "text",
    }
    if wa_id is not None:
        msg["from"] = wa_id
    if bsuid is not None:
        msg["from_user_id"] = bsuid
    if parent is not None:
        msg["from_parent_user_id"] = parent
    if ref is not None:
        msg["referral"] = ref
    return msg


def system_message(
    wamid: str,
    kind: str,
    *,
    wa_id: str | None = None,
    bsuid: str | None = None,
    new_wa_id: str | None = None,
    new_bsuid: str | None = None,
    previous_bsuid: str | None = None,
    ts: float | None = None,
) -> dict[str, Any]:
    """Return a ``user_changed_number`` / ``user_changed_user_id`` system message."""
    system: dict[str, Any] = {"body": "User changed", "type": kind}
    if new_wa_id is not None:
        system["wa_id"] = new_wa_id
    if new_bsuid is not None:
        system["user_id"] = new_bsuid
    if previous_bsuid is not None:
        system["previous_user_id"] = previous_bsuid
    msg = message(wa_id, wamid, ts=ts, bsuid=new_bsuid or bsuid)
    del msg["text"]
    msg.update(type="system", system=system)
    return msg


def messages_change(
    messages: list[dict[str, Any]],
    *,
    phone_number_id: str = PHONE_NUMBER_ID,
    names: dict[str, str] | None = None,
    usernames: dict[str, str] | None = None,
) -> dict[str, Any]:
    contacts: dict[tuple[str | None, str | None], dict[str, Any]] = {}
    for m in messages:
        if m.get("type") == "system":
            continue  # Meta sends system messages without contacts
        wa_id, user_id = m.get("from"), m.get("from_user_id")
        contact: dict[str, Any] = {
            "profile": {"name": (names or {}).get(wa_id or "", "Sheena Nelson")}
        }
        if wa_id is not None:
            contact["wa_id"] = wa_id
        if user_id is not None:
            contact["user_id"] = user_id
            if user_id in (usernames or {}):
                contact["profile"]["username"] = (usernames or {})[user_id]
        contacts[(wa_id, user_id)] = contact
    return {
        "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": phone_number_id},
            "contacts": list(contacts.values()),
            "messages": messages,
        },
        "field": "messages",
    }


def automatic_change(
    events: list[dict[str, Any]], *, phone_number_id: str = PHONE_NUMBER_ID
) -> dict[str, Any]:
    return {
        "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": phone_number_id},
            "automatic_events": events,
        },
        "field": "automatic_events",
    }


def notification(*changes: dict[str, Any], waba_id: str = WABA_ID) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": waba_id, "changes": list(changes)}],
    }


def encode(payload: dict[str, Any]) -> bytes:
    """Serialize as Meta does: compact, non-ASCII escaped as \\uXXXX."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode()


async def post_signed(
    client: TestClient[web.Request, web.Application],
    payload: dict[str, Any] | bytes,
    **headers: str,
) -> dict[str, Any]:
    """POST a notification to the webhook, signed as Meta signs it; return the 200 answer."""
    body = payload if isinstance(payload, bytes) else encode(payload)
    resp = await client.post("/webhooks/whatsapp", data=body, headers={**signed(body), **headers})
    answer: dict[str, Any] = await resp.json()
    assert resp.status == 200, answer
    return answer
