"""Builders for Meta's webhook payloads, shaped like the documented examples in fixtures/."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gateway.signature import sign
from tests.conftest import APP_SECRET, PHONE_NUMBER_ID, WABA_ID

FIXTURES = Path(__file__).parent / "fixtures"


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
    wa_id: str,
    wamid: str,
    *,
    ts: float | None = None,
    ref: dict[str, Any] | None = None,
    text: str = "Can I get more info about this?",
) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "from": wa_id,
        "id": wamid,
        "timestamp": str(int(time.time() if ts is None else ts)),
        "text": {"body": text},
        "type": "text",
    }
    if ref is not None:
        msg["referral"] = ref
    return msg


def messages_change(
    messages: list[dict[str, Any]],
    *,
    phone_number_id: str = PHONE_NUMBER_ID,
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    wa_ids = dict.fromkeys(m["from"] for m in messages)
    return {
        "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": phone_number_id},
            "contacts": [
                {"profile": {"name": (names or {}).get(w, "Sheena Nelson")}, "wa_id": w}
                for w in wa_ids
            ],
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
