"""validate -> resolve -> normalize -> persist -> deliver, with no HTTP in sight.

The HTTP view and the CLI's ``send`` both drive this; what it returns is an :class:`Outcome`
that each renders in its own way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog

from gateway.config import AccountConfig, Settings
from gateway.delivery.service import DeliveryService
from gateway.domain import Conversation, PreparedEvent, SinkState, StoredEvent, overall_status
from gateway.draft import EventDraft, IncompleteEvent
from gateway.errors import (
    ConfigError,
    Conflict,
    GatewayError,
    InvalidRequest,
    NotFound,
    Unprocessable,
)
from gateway.metrics import Metrics
from gateway.phones import parse_phone
from gateway.plugin_manager import Plugins, is_plugin_fault, sink_fault
from gateway.store.database import Store
from gateway.validation import check_conversion
from gateway.wire import (
    ERASED_DIGEST,
    ConversionRequest,
    request_fingerprint,
    sha256_fingerprint,
)

__all__ = ["Outcome", "Pipeline", "changed_fields", "check_normalizers"]

log = structlog.get_logger()


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What happened to one conversion request."""

    event: StoredEvent
    duplicate: bool
    # The sink whose outcome the answer reports (``[plugins] primary_sink``).
    primary: str

    @property
    def primary_state(self) -> SinkState | None:
        """The primary sink's state (None for an event stored before that sink was added)."""
        return self.event.deliveries.get(self.primary)

    @property
    def dry_run_payload(self) -> dict[str, Any] | None:
        """The exact Meta request body the first dry-run sink would send."""
        for state in self.event.deliveries.values():
            if state.status == "dry_run" and state.payload is not None:
                return state.payload
        return None


class Pipeline:
    """Everything between a decoded request and its stored, delivered outcome."""

    def __init__(
        self,
        settings: Settings,
        plugins: Plugins,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        delivery: DeliveryService | None = None,
    ) -> None:
        self.settings = settings
        self.plugins = plugins
        self.store = store
        self.clock = clock
        self.metrics = metrics or Metrics()
        # None when nothing delivers in this process (dry runs, one-shot commands): outbox
        # deliveries then wait for a serving gateway.
        self.delivery = delivery

    def account(self, account_id: str) -> AccountConfig:
        """Return the configured account or raise 404."""
        account = self.settings.account(account_id)
        if account is None:
            raise NotFound(
                f"Unknown account {account_id!r}; use an id from the gateway's [[accounts]].",
                code="account_not_found",
                param="accountId",
            )
        return account

    async def prepare(self, request: ConversionRequest, account: AccountConfig) -> PreparedEvent:
        """Validate, resolve and normalize; nothing is written."""
        now = self.clock()
        check_conversion(request, self.settings.events, now=now)
        if self.store.suppressed:
            self._refuse_suppressed(request, account)
        found = await self.plugins.resolve(request, account, self.store)
        if found is None:
            fields = self.plugins.resolver_fields
            names = ", ".join(f"`{f}`" for f in fields) or "(none: no resolver is configured)"
            raise InvalidRequest(
                f"Send one of {names} so the gateway can find the conversation (and its click"
                " id) this conversion belongs to; no configured resolver"
                f" ({', '.join(self.plugins.roles['resolvers']) or 'none'}) applies to this"
                " request.",
                code="missing_conversation",
                param=fields[0] if fields else None,
                details={"fields": fields},
            )
        conversation, resolution = found
        if self.store.suppressed:
            # However it was found (conversationId, externalId...): it may be theirs.
            c = conversation
            if self.store.is_suppressed(account.id, "phone", [c.wa_id]) or (
                self.store.is_suppressed(account.id, "bsuid", [c.bsuid, c.parent_bsuid])
            ):
                raise _suppressed(resolution.field or "conversationId")
        if not conversation.ctwa_clid:
            raise Unprocessable(
                "The resolved conversation has no captured ctwa_clid",
                code="missing_ctwa_clid",
                param=resolution.field,
                details={"conversationId": conversation.id, "resolver": resolution.resolver},
            )
        draft = EventDraft()
        self.plugins.normalize(draft, request, account, conversation, now)
        event = draft.finish()
        clicked = conversation.click_time()
        window = self.settings.events.attribution_window_s
        return PreparedEvent(
            request=request,
            account=account,
            conversation=conversation,
            event=event,
            test_event_code=draft.test_event_code,
            received_at=now,
            attribution_window_expired=clicked is not None
            and int(event["event_time"]) - clicked > window,
            resolution=resolution,
        )

    def _refuse_suppressed(self, request: ConversionRequest, account: AccountConfig) -> None:
        phone = parse_phone(request.phone_e164) if request.phone_e164 else None
        phones = [digits for digits, _ in phone.forms] if phone else []
        bsuids = [request.business_scoped_user_id]
        if self.store.is_suppressed(account.id, "phone", phones) or self.store.is_suppressed(
            account.id, "bsuid", bsuids
        ):
            raise _suppressed("phoneE164" if phones else "businessScopedUserId")

    async def handle(
        self, request: ConversionRequest, account: AccountConfig, *, started: float | None = None
    ) -> Outcome:
        """Run the whole pipeline; the outcome is committed before this returns.

        A repeated ``eventId`` gets the stored outcome back. The common case, a new event, pays
        no lookup for that: the insert itself detects the duplicate, and only a request that
        fails preparation checks whether it is a retry of one already accepted (a retry after
        the conversation changed, or past Meta's 7 days, still gets its original answer).
        """
        try:
            prepared = await self.prepare(request, account)
        except GatewayError:
            existing = await self.store.find_event(account.id, request.event_id)
            if existing is not None:
                return await self._repeat(existing, request)
            raise
        return await self.submit(prepared, started=started)

    def repeated(self, existing: StoredEvent, request: ConversionRequest) -> Outcome:
        """Answer a known eventId: the original outcome if this is a retry of it, else 409."""
        differ = changed_fields(existing.request_fields, request)
        if differ and self.settings.events.on_reused_event_id == "conflict":
            raise Conflict(
                f"eventId {request.event_id[:256]!r} was already used on this account for a"
                f" conversion with other {', '.join(f'`{f}`' for f in differ)}; nothing was"
                " sent. Use a new eventId for a new conversion, or resend the same body to get"
                " the original answer.",
                code="event_id_reused",
                param=differ[0],
                details={"fields": differ},
            )
        self.metrics.child(self.metrics.events_duplicate, existing.account_id).inc()
        return Outcome(event=existing, duplicate=True, primary=self.plugins.primary_sink)

    async def _repeat(self, existing: StoredEvent, request: ConversionRequest) -> Outcome:
        """:meth:`repeated`; a retry racing the original's first attempt (sent at once, or to
        another replica) waits for that attempt as the original does, so both answer alike
        rather than one "delivered" and the other "queued"."""
        outcome = self.repeated(existing, request)
        primary = outcome.primary
        state = existing.deliveries.get(primary)
        delivery = self.delivery
        if (
            delivery is None
            or state is None
            or state.attempts  # retrying already: its state is the answer
            or not delivery.waits_for(primary, state)
            # Past the original's own wait (an event held back, its claimant dead): nothing
            # is under way to wait for, and the original answered as this one will.
            or self.clock() - existing.received_at > delivery.answer_window_s(primary)
        ):
            return outcome
        found = await delivery.outcome(primary, existing.pk)
        if found is None:
            return outcome
        deliveries = {**existing.deliveries, primary: found}
        event = msgspec.structs.replace(
            existing, deliveries=deliveries, status=overall_status(deliveries)
        )
        return msgspec.structs.replace(outcome, event=event)

    async def submit(self, prepared: PreparedEvent, *, started: float | None = None) -> Outcome:
        """Store the prepared event with its sinks' states, then let the sinks act on it."""
        states = self.plugins.accept(prepared)
        request = prepared.request
        begun = prepared.received_at if started is None else started
        new = StoredEvent(
            pk=0,
            # Its sinks' status, as the store keeps it (worked out here, not copied later).
            status=overall_status(states),
            account_id=prepared.account.id,
            event_id=request.event_id,
            event_name=request.event_name,
            conversation_id=prepared.conversation.id,
            event_time=int(prepared.event["event_time"]),
            event=prepared.event,
            test_event_code=prepared.test_event_code,
            received_at=prepared.received_at,
            duration_ms=round((self.clock() - begun) * 1e6) / 1000,  # see the middleware
            deliveries=states,
            attribution_window_expired=prepared.attribution_window_expired,
            resolution=prepared.resolution,
            request_fields=request_fingerprint(request),
        )
        stored, duplicate = await self.store.insert_event(new)
        if duplicate:
            return await self._repeat(stored, request)
        for sink in states:
            self.metrics.events_accepted.inc(new.account_id, sink)
        stored = await self._deliver(stored)
        return Outcome(event=stored, duplicate=False, primary=self.plugins.primary_sink)

    async def _deliver(self, stored: StoredEvent) -> StoredEvent:
        """Let the sinks act on a committed event; return it with the states they report.

        Immediate sinks run their deliver hook; if the primary sink is an outbox sink, the
        request waits (its ``respond_within_ms``) for the first attempt. Each sink is on its
        own: one that raises or hangs (past ``[plugins] sink_timeout_s``) ends ``failed`` with
        the reason, logged with its traceback, and never changes another sink's outcome or the
        answer.
        """
        waits, failed = self.plugins.deliver(stored)
        delivery = self.delivery
        if delivery is not None:
            delivery.notify()
        # Only the primary sink's outcome shapes the answer: a slow CRM webhook must not slow
        # every request. The other outbox sinks deliver in the background.
        primary = self.plugins.primary_sink
        state = stored.deliveries.get(primary)
        queued = {}
        if delivery is not None and state is not None and delivery.waits_for(primary, state):
            queued[primary] = delivery.outcome(primary, stored.pk)
        reported: dict[str, SinkState] = {}
        observed: dict[str, SinkState] = {}
        if waits or queued:
            timeout = self.settings.plugins.sink_timeout_s
            names = [*waits, *queued]
            results = await asyncio.gather(
                *(asyncio.wait_for(_awaited(a), timeout) for a in waits.values()),
                *queued.values(),
                return_exceptions=True,
            )
            for name, result in zip(names, results, strict=True):
                if isinstance(result, BaseException) and is_plugin_fault(result):
                    failed[name] = sink_fault(
                        name, "gateway_deliver_event", result, stored.event_id
                    )
                elif isinstance(result, BaseException):
                    raise result  # cancellation: the request is going away
                elif result is None:
                    continue
                elif name in queued:
                    observed[name] = result  # the dispatcher stored it
                elif isinstance(result, SinkState):
                    reported[name] = result
                else:
                    failed[name] = sink_fault(
                        name,
                        "gateway_deliver_event",
                        TypeError(f"returned {type(result).__name__}, not a SinkState"),
                        stored.event_id,
                    )
        if failed or reported:
            await self.store.update_deliveries(stored.pk, {**reported, **failed})
        if not (failed or reported or observed):
            return stored
        deliveries = {**stored.deliveries, **observed, **reported, **failed}
        return msgspec.structs.replace(
            stored, deliveries=deliveries, status=overall_status(deliveries)
        )


async def _awaited(awaitable: Awaitable[SinkState | None]) -> SinkState | None:
    return await awaitable


def _suppressed(param: str) -> Unprocessable:
    return Unprocessable(
        "This person was erased on request and asked not to be processed again; the"
        " conversion was not stored.",
        code="person_suppressed",
        param=param,
    )


def changed_fields(before: dict[str, str] | None, request: ConversionRequest) -> list[str]:
    """Return the fields of ``request`` whose checksums differ from the stored ones (sent
    once and not the other time included).

    An event stored before fingerprints existed compares equal: its retries keep working. One
    stored before CRC-32 fingerprints holds SHA-256 ones, and is compared with those. A
    person's field whose digest an erasure removed compares equal if it is sent again (it
    was sent, but what it said is gone); sent only now, or only then, it differs.
    """
    if before is None:
        return []
    if any(len(v) == 16 for v in before.values()):
        now = sha256_fingerprint(request)
    else:
        now = request_fingerprint(request)
    names = (before.keys() | now.keys()) - _KEY_FIELDS
    return sorted(
        name
        for name in names
        if before.get(name) != now.get(name)
        and not (before.get(name) == ERASED_DIGEST and name in now)
    )


# The stored event's key: a reuse always has the same.
_KEY_FIELDS = frozenset({"accountId", "eventId"})


def check_normalizers(settings: Settings, plugins: Plugins) -> None:
    """Build a sample event with the normalizers; raise ConfigError if Meta would refuse it.

    Run at startup, so a normalizer list missing ``business_messaging`` stops the gateway
    instead of failing every request.
    """
    now = time.time()
    account = settings.accounts[0] if settings.accounts else None
    if account is None:
        return
    sample = ConversionRequest(
        account_id=account.id,
        event_name=settings.events.allowed_names[0],
        event_id="startup-check",
        conversation_id="conv_startup_check",
        email="startup-check@example.com",
        external_id="startup-check",
    )
    conversation = Conversation(
        id="conv_startup_check",
        account_id=account.id,
        wa_id="10000000000",
        created_at=now,
        ctwa_clid="startup-check-clid",
    )
    draft = EventDraft()
    plugins.normalize(draft, sample, account, conversation, now)
    try:
        draft.finish()
    except IncompleteEvent as exc:
        raise ConfigError(f"{settings.source}: [plugins] normalizers: {exc}") from None
