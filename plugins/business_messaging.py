"""Normalizer: the fields that make an event a business-messaging (WhatsApp) event.

``event_name``, ``event_id``, ``action_source=business_messaging``,
``messaging_channel=whatsapp``, and the unhashed ``whatsapp_business_account_id`` and
``ctwa_clid`` that let Meta attribute the conversion to the ad click.
"""

from __future__ import annotations

from gateway import AccountConfig, Conversation, ConversionRequest, EventDraft, hookimpl


@hookimpl
def gateway_normalize_event(
    draft: EventDraft,
    request: ConversionRequest,
    account: AccountConfig,
    conversation: Conversation,
) -> None:
    draft.event["event_name"] = request.event_name
    draft.event["event_id"] = request.event_id
    draft.event["action_source"] = "business_messaging"
    draft.event["messaging_channel"] = "whatsapp"
    draft.user_data["whatsapp_business_account_id"] = account.waba_id
    draft.user_data["ctwa_clid"] = conversation.ctwa_clid
