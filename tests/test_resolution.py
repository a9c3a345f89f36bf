"""Every conversion to the right click: by BSUID, by phone in WhatsApp's forms, by a third-party
resolver; through the real app, with conversations captured by the real webhook."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import AccountConfig, Conversation, ConversionRequest, Store, hookimpl
from tests.conftest import AUTH, WABA_ID, ClientFactory, store_of
from tests.payloads import (
    BSUID_CLID,
    SHEENA,
    SHEENA_PARENT,
    fixture,
    message,
    messages_change,
    notification,
    post_signed,
    referral,
    system_message,
)

# Run on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_ENGINES = True

Client = TestClient[web.Request, web.Application]
URL = "/v1/whatsapp/conversions"


def purchase(event_id: str, **identity: str) -> dict[str, Any]:
    return {"accountId": "acme", "eventName": "Purchase", "eventId": event_id, "value": 20,
            "currency": "USD", **identity}  # fmt: skip


async def convert(client: Client, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await client.post(URL, json=body, headers=AUTH)
    answer: dict[str, Any] = await resp.json()
    return resp.status, answer


async def test_a_purchase_by_bsuid_carries_the_bsuid_conversations_click(client: Client) -> None:
    await post_signed(client, fixture("webhook_bsuid_username_referral.json"))
    status, answer = await convert(client, purchase("b-1", businessScopedUserId=SHEENA))
    assert status == 200, answer
    user_data = answer["payload"]["data"][0]["user_data"]
    assert user_data["ctwa_clid"] == BSUID_CLID
    assert user_data["whatsapp_business_account_id"] == WABA_ID
    assert answer["resolution"] == {
        "resolver": "business_scoped_user_id", "field": "businessScopedUserId", "form": "as_sent"
    }  # fmt: skip


async def test_a_parent_or_former_bsuid_finds_the_conversation_too(client: Client) -> None:
    await post_signed(client, fixture("webhook_bsuid_username_referral.json"))
    await post_signed(client, fixture("webhook_bsuid_with_phone.json"))
    status, answer = await convert(client, purchase("b-2", businessScopedUserId=SHEENA_PARENT))
    assert (status, answer["resolution"]["form"]) == (200, "parent")
    await post_signed(client, fixture("webhook_system_user_changed_user_id.json"))
    status, answer = await convert(client, purchase("b-3", businessScopedUserId=SHEENA))
    assert (status, answer["resolution"]["form"]) == (200, "former_bsuid")
    assert answer["payload"]["data"][0]["user_data"]["ctwa_clid"] == BSUID_CLID


async def test_an_unknown_bsuid_is_404_naming_it(client: Client) -> None:
    status, answer = await convert(client, purchase("b-4", businessScopedUserId="US.404"))
    assert (status, answer["code"], answer["param"]) == (
        404, "conversation_not_found", "businessScopedUserId"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("stored", "typed", "form"),
    [
        # Mexico: WhatsApp ids of older accounts carry a 1 after 52; people dial without it.
        ("5215512345678", "+52 55 1234 5678", "mexico_with_1"),
        ("525512345678", "+52 1 55 1234 5678", "mexico_without_1"),
        ("5218112345678", "52 81 1234 5678", "mexico_with_1"),
        # Argentina: WhatsApp ids of mobiles carry the 9; CRMs drop it.
        ("5491112345678", "+54 11 1234-5678", "argentina_with_9"),
        ("5493514123456", "+54 351 412-3456", "argentina_with_9"),
        ("5491112345678", "+54 9 11 1234-5678", "as_sent"),
        # Brazil: mobiles with and without the ninth digit.
        ("551187654321", "+55 (11) 98765-4321", "brazil_without_9"),
        ("5511987654321", "+55 11 8765-4321", "brazil_with_9"),
        ("552199887766", "+55 21 99988-7766", "brazil_without_9"),
        ("551123456789", "+55 11 2345-6789", "as_sent"),  # a landline: no variant
        # Elsewhere, the number as typed.
        ("16505551234", "+1 (650) 555-1234", "as_sent"),
        ("447911123456", "+44 7911 123456", "as_sent"),
        ("4915123456789", "0049 1512 3456789", "as_sent"),
        ("919876543210", "+91 98765 43210", "as_sent"),
        ("33612345678", "+33 6 12 34 56 78", "as_sent"),
        ("819012345678", "+81 90-1234-5678", "as_sent"),
        ("2348031234567", "+234 803 123 4567", "as_sent"),
        ("390612345678", "+39 06 1234 5678", "as_sent"),  # Italy keeps its leading zero
    ],
)
async def test_phones_as_typed_find_the_whatsapp_id(
    client: Client, stored: str, typed: str, form: str
) -> None:
    ref = referral(f"clid-{stored}")
    await post_signed(
        client, notification(messages_change([message(stored, f"w.{stored}", ref=ref)]))
    )
    status, answer = await convert(client, purchase(f"p-{stored}", phoneE164=typed))
    assert status == 200, answer
    assert answer["payload"]["data"][0]["user_data"]["ctwa_clid"] == f"clid-{stored}"
    assert answer["resolution"] == {"resolver": "phone", "field": "phoneE164", "form": form}


async def test_a_brazilian_landline_gets_no_ninth_digit(client: Client) -> None:
    # Stored with a 9 in front of a landline's 8 digits: a different number, not the same one.
    ref = referral("other")
    await post_signed(
        client, notification(messages_change([message("5511923456789", "w.l", ref=ref)]))
    )
    status, answer = await convert(client, purchase("landline", phoneE164="+55 11 2345-6789"))
    assert (status, answer["code"]) == (404, "conversation_not_found")


@pytest.mark.parametrize("typed", ["+1 999 555 1234", "+52 55 12", "+44 7700 900123", "12345"])
async def test_numbers_that_cannot_exist_are_400(client: Client, typed: str) -> None:
    status, answer = await convert(client, purchase("bad", phoneE164=typed))
    assert (status, answer["code"], answer["param"]) == (400, "invalid_phone", "phoneE164")


async def test_two_people_behind_one_typed_number_take_the_latest_click_and_say_so(
    client: Client,
) -> None:
    older = message("525512345678", "w.a", ts=1.77e9, ref=referral("older-click"))
    newer = message("5215512345678", "w.b", ts=1.77e9 + 60, ref=referral("newer-click"))
    await post_signed(client, notification(messages_change([older, newer])))
    status, answer = await convert(client, purchase("amb", phoneE164="+52 55 1234 5678"))
    assert status == 200, answer
    assert answer["payload"]["data"][0]["user_data"]["ctwa_clid"] == "newer-click"
    assert answer["resolution"]["ambiguous"] is True
    assert answer["resolution"]["form"] == "mexico_with_1"


async def test_a_former_number_still_finds_the_person(client: Client) -> None:
    ref = referral("kept")
    await post_signed(
        client,
        notification(messages_change([message("16505550301", "w.o", bsuid="US.F", ref=ref)])),
    )
    change = system_message("w.s", "user_changed_number", wa_id="16505550301", bsuid="US.F",
                            new_wa_id="16505550302")  # fmt: skip
    await post_signed(client, notification(messages_change([change])))
    status, answer = await convert(client, purchase("old-number", phoneE164="+1 650 555 0301"))
    assert (status, answer["resolution"]["form"]) == (200, "former_number")
    assert answer["payload"]["data"][0]["user_data"]["ctwa_clid"] == "kept"


async def test_without_any_identifier_the_chain_names_what_to_send(client: Client) -> None:
    status, answer = await convert(client, purchase("none"))
    assert (status, answer["code"], answer["param"]) == (
        400,
        "missing_conversation",
        "conversationId",
    )
    assert answer["details"]["fields"] == ["conversationId", "businessScopedUserId", "phoneE164"]


class ByCustomer:
    """A third-party resolver: conversions identified by the CRM's customer id."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    @hookimpl
    def gateway_declare_fields(self) -> list[str]:
        return ["externalId"]

    @hookimpl
    def gateway_resolve_conversation(
        self, request: ConversionRequest, account: AccountConfig, store: Store
    ) -> Awaitable[Conversation | None] | None:
        if request.external_id not in self.table:
            return None
        return store.get_conversation(account.id, self.table[request.external_id])


async def test_a_third_party_resolver_keyed_on_external_id(
    make_client: ClientFactory, config: dict[str, Any]
) -> None:
    table: dict[str, str] = {}
    plugins = {**config["plugins"], "resolvers": ["crm", "conversation_id"]}
    client = await make_client(plugins=plugins, extra={"crm": ByCustomer(table)})
    await post_signed(
        client, notification(messages_change([message("16505550400", "w.c", ref=referral("crm"))]))
    )
    (conversation,) = await store_of(client).recent_conversations("acme", limit=1)
    table["cust-42"] = conversation.id
    status, answer = await convert(client, purchase("crm-1", externalId="cust-42"))
    assert status == 200, answer
    assert answer["resolution"] == {"resolver": "crm", "field": "externalId"}
    assert answer["payload"]["data"][0]["user_data"]["ctwa_clid"] == "crm"
    status, answer = await convert(client, purchase("crm-2"))
    assert answer["details"]["fields"] == ["externalId", "conversationId"]


async def test_the_openapi_document_shows_the_bsuid_field(client: Client) -> None:
    schemas = (await (await client.get("/openapi.json")).json())["components"]["schemas"]
    assert "businessScopedUserId" in schemas["ConversionRequest"]["properties"]
    assert "resolution" in schemas["ConversionResponse"]["properties"]
    assert set(schemas["ResolutionView"]["properties"]) == {
        "resolver",
        "field",
        "form",
        "ambiguous",
    }


async def test_a_number_left_after_a_change_is_not_the_previous_owners_any_more(
    client: Client,
) -> None:
    a = message("16505550011", "w.a1", ts=1.77e9, bsuid="US.1000", ref=referral("CLID-A"))
    await post_signed(client, notification(messages_change([a])))
    move = system_message("w.a2", "user_changed_number", wa_id="16505550011", bsuid="US.1000",
                          new_wa_id="16505550012", ts=1.77e9 + 10)  # fmt: skip
    await post_signed(client, notification(messages_change([move])))
    # Someone else now writes from the number A left, without a click.
    b = message("16505550011", "w.b1", ts=1.77e9 + 20, bsuid="US.2000")
    await post_signed(client, notification(messages_change([b])))
    status, answer = await convert(client, purchase("left-1", phoneE164="+1 650 555 0011"))
    assert (status, answer["code"]) == (422, "missing_ctwa_clid")
    # B clicks; A writes again from the new number: the old number still means B.
    b2 = message("16505550011", "w.b2", ts=1.77e9 + 30, bsuid="US.2000", ref=referral("CLID-B"))
    a2 = message("16505550012", "w.a3", ts=1.77e9 + 40, bsuid="US.1001")
    await post_signed(client, notification(messages_change([b2, a2])))
    status, answer = await convert(client, purchase("left-2", phoneE164="+1 650 555 0011"))
    assert status == 200, answer
    assert answer["payload"]["data"][0]["user_data"]["ctwa_clid"] == "CLID-B"
    assert answer["resolution"]["form"] == "as_sent"


async def test_a_brazilian_mobile_never_matches_the_landline_of_its_last_8_digits(
    client: Client,
) -> None:
    ref = referral("CLID-BR-LAND")
    await post_signed(
        client, notification(messages_change([message("551131230003", "w.bl", ref=ref)]))
    )
    status, answer = await convert(client, purchase("br-9", phoneE164="+55 11 93123-0003"))
    assert (status, answer["code"]) == (404, "conversation_not_found")


async def test_a_stored_id_phonenumbers_calls_invalid_is_still_reachable(client: Client) -> None:
    # Meta's ids arrive as Meta sends them; a number outside the library's known ranges that
    # WhatsApp did send is a real WhatsApp user.
    ref = referral("CLID-IL")
    await post_signed(
        client, notification(messages_change([message("972501234567", "w.il", ref=ref)]))
    )
    status, answer = await convert(client, purchase("il-1", phoneE164="972501234567"))
    assert (status, answer["payload"]["data"][0]["user_data"]["ctwa_clid"]) == (200, "CLID-IL")


async def test_a_conversation_merged_away_answers_with_the_one_that_took_over(
    client: Client,
) -> None:
    # Found by review: a conversation merged into the clicked one (its BSUID and the clicked
    # conversation's phone turned out to be one person) was a 422 missing_ctwa_clid by its id,
    # though GET /v1/whatsapp/conversations lists it and the person's click was kept.
    clicked = message("16505550021", "w.m1", ts=1.77e9, ref=referral("CLID-M"))
    await post_signed(client, notification(messages_change([clicked])))
    await post_signed(
        client, notification(messages_change([message(None, "w.m2", ts=1.77e9 + 5, bsuid="US.M")]))
    )
    (merged_away,) = await store_of(client).recent_conversations("acme", bsuid="US.M", limit=1)
    both = message("16505550021", "w.m3", ts=1.77e9 + 10, bsuid="US.M")
    assert (await post_signed(client, notification(messages_change([both]))))[
        "conversationsMerged"
    ] == 1
    status, answer = await convert(client, purchase("m-1", conversationId=merged_away.id))
    assert status == 200, answer
    assert answer["payload"]["data"][0]["user_data"]["ctwa_clid"] == "CLID-M"
    assert answer["conversationId"] != merged_away.id
    assert answer["resolution"] == {
        "resolver": "conversation_id", "field": "conversationId", "form": "successor"
    }  # fmt: skip


async def test_a_recycled_number_s_previous_owner_is_not_followed_by_id(client: Client) -> None:
    # The number's new owner is someone else: their click never answers for the id of the
    # previous owner's conversation.
    a = message("16505550031", "w.r1", ts=1.77e9, bsuid="US.R1")
    await post_signed(client, notification(messages_change([a])))
    (previous,) = await store_of(client).recent_conversations("acme", bsuid="US.R1", limit=1)
    b = message("16505550031", "w.r2", ts=1.77e9 + 10, bsuid="US.R2", ref=referral("CLID-R"))
    await post_signed(client, notification(messages_change([b])))
    status, answer = await convert(client, purchase("r-1", conversationId=previous.id))
    assert (status, answer["code"]) == (422, "missing_ctwa_clid")
