"""A small store with known numbers, for the stats API's and the console's tests (and the
README's screenshots): three ads and an organic conversation on ``acme``, one conversation on
``other``; events stored through the real store with the statuses the tests count."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from gateway.domain import Conversation, SinkState, StoredEvent
from gateway.store.database import Store
from tests.conftest import CLID

HOUR = 3600
DAY = 86400


@dataclass(frozen=True)
class Seeded:
    now: float
    # conversation ids by name
    ids: dict[str, str]


def stored_event(
    conversation: Conversation,
    event_id: str,
    name: str,
    status: str,
    event_time: float,
    value: float | None = None,
    currency: str | None = None,
    expired: bool = False,
) -> StoredEvent:
    custom: dict[str, Any] = {}
    if value is not None:
        custom = {"value": value, "currency": currency}
    event = {
        "event_name": name,
        "event_id": event_id,
        "action_source": "business_messaging",
        "messaging_channel": "whatsapp",
        "event_time": int(event_time),
        "user_data": {
            "whatsapp_business_account_id": "102290129340398",
            "ctwa_clid": conversation.ctwa_clid,
        },
        **({"custom_data": custom} if custom else {}),
    }
    state = SinkState(
        status=status,  # type: ignore[arg-type]
        attempts=0 if status == "dry_run" else 1,
        error="Meta refused it: the token expired; set a new one and replay"
        if status == "failed"
        else None,
        error_code="190" if status == "failed" else None,
    )
    return StoredEvent(
        pk=0,
        account_id=conversation.account_id,
        event_id=event_id,
        event_name=name,
        conversation_id=conversation.id,
        event_time=int(event_time),
        status=status,
        event=event,
        test_event_code=None,
        received_at=event_time + 1,
        duration_ms=1.0,
        deliveries={"meta_capi": state},
        attribution_window_expired=expired,
    )


async def seed(store: Store, now: float | None = None) -> Seeded:
    """Store the known conversations and events; return their ids."""
    # Whole seconds: event times are whole seconds, so medians come out exact.
    now = float(int(time.time() if now is None else now))
    ads = {
        "a1": ("120000000000000001", "Summer sale", "https://fb.me/summer", 2 * DAY),
        "a2": ("120000000000000001", "Summer sale", "https://fb.me/summer", 3 * DAY),
        "b1": ("120000000000000002", "Free quote", "https://fb.me/quote", 1 * DAY),
        "c1": ("120000000000000003", "New menu", "https://fb.me/menu", 4 * DAY),
    }
    ids: dict[str, str] = {}
    conversations: dict[str, Conversation] = {}
    for i, (name, (ad, headline, url, ago)) in enumerate(ads.items()):
        at = now - ago
        conversations[name] = await store.add_conversation(
            Conversation(
                id=f"conv_seed_{name}",
                account_id="acme",
                created_at=at,
                wa_id=f"1650555100{i}",
                last_inbound_at=at,
                ctwa_clid=f"{CLID[:40]}-{name}",
                ctwa_captured_at=at,
                ctwa_clicked_at=at,
                ctwa_source_id=ad,
                ctwa_source_url=url,
                ctwa_headline=headline,
                ctwa_source_type="ad",
            )
        )
    organic_at = now - 5 * DAY
    conversations["o1"] = await store.add_conversation(
        Conversation(
            id="conv_seed_o1",
            account_id="acme",
            created_at=organic_at,
            wa_id="16505552000",
            last_inbound_at=organic_at,
        )
    )
    other_at = now - DAY
    conversations["x1"] = await store.add_conversation(
        Conversation(
            id="conv_seed_x1",
            account_id="other",
            created_at=other_at,
            wa_id="16505553000",
            last_inbound_at=other_at,
            ctwa_clid=f"{CLID[:40]}-x1",
            ctwa_captured_at=other_at,
            ctwa_clicked_at=other_at,
            ctwa_source_id="990000000000000009",
            ctwa_headline="Other's ad",
            ctwa_source_type="ad",
        )
    )
    a1, a2, b1 = conversations["a1"], conversations["a2"], conversations["b1"]
    c1, x1 = conversations["c1"], conversations["x1"]
    events = [
        # a1: bought an hour after the click, then a second purchase that failed.
        stored_event(a1, "order-a1-1", "Purchase", "delivered", a1.created_at + HOUR, 40.0, "USD"),
        stored_event(a1, "order-a1-2", "Purchase", "failed", a1.created_at + 5 * HOUR, 10.0, "USD"),
        # a2: a lead three hours after the click.
        stored_event(a2, "lead-a2", "LeadSubmitted", "delivered", a2.created_at + 3 * HOUR),
        # b1: a purchase in euros, still pending, sent after the click window (flagged).
        stored_event(
            b1,
            "order-b1",
            "Purchase",
            "pending",
            b1.created_at + 2 * HOUR,
            25.5,
            "EUR",
            expired=True,
        ),
        # c1: a purchase that could not reach Meta in time.
        stored_event(c1, "order-c1", "Purchase", "expired", c1.created_at + 7 * HOUR, 15.0, "USD"),
        # other's account: must never show on acme's pages or answers.
        stored_event(x1, "order-x1", "Purchase", "delivered", x1.created_at + HOUR, 999.0, "USD"),
    ]
    for event in events:
        await store.insert_event(event)
    ids = {name: c.id for name, c in conversations.items()}
    return Seeded(now=now, ids=ids)


# What the seeded store adds up to for acme over the last 7 days.
ACME_TOTALS = {
    "clicks": 4,
    "conversations": 5,
    "conversions": {"delivered": 2, "failed": 1, "pending": 1, "expired": 1, "dryRun": 0},
    "events": 5,
    "value": [{"currency": "USD", "value": 65.0}, {"currency": "EUR", "value": 25.5}],
    "withinWindow": 4,
    "withinWindowShare": 0.8,
    "testEvents": 0,
}
