"""The Meta event under construction, and the check it must pass when the normalizers are done."""

from __future__ import annotations

from typing import Any

from gateway.hashing import is_sha256_hex

__all__ = ["HASHED_USER_DATA", "REQUIRED_FIELDS", "EventDraft", "IncompleteEvent"]

# user_data keys that Meta requires hashed; ctwa_clid and whatsapp_business_account_id are
# never hashed.
HASHED_USER_DATA = frozenset(
    {"em", "ph", "external_id", "fn", "ln", "db", "ge", "ct", "st", "zp", "country"}
)
REQUIRED_FIELDS = ("event_name", "event_time", "event_id", "action_source", "messaging_channel")
_REQUIRED_USER_DATA = ("whatsapp_business_account_id", "ctwa_clid")


class IncompleteEvent(Exception):
    """The configured normalizers built an event Meta would refuse: a configuration bug."""


class EventDraft:
    """A mutable Meta event; normalizers fill it, :meth:`finish` freezes it into a dict."""

    def __init__(self) -> None:
        self.event: dict[str, Any] = {}
        self.user_data: dict[str, Any] = {}
        self.custom_data: dict[str, Any] = {}
        self.test_event_code: str | None = None

    def finish(self) -> dict[str, Any]:
        """Return the finished event, or raise :class:`IncompleteEvent` saying what is wrong."""
        event = dict(self.event)
        event["user_data"] = dict(self.user_data)
        if self.custom_data:
            event["custom_data"] = dict(self.custom_data)
        if not self._complete(event):
            missing = [f for f in REQUIRED_FIELDS if event.get(f) in (None, "")]
            missing += [f"user_data.{f}" for f in _REQUIRED_USER_DATA if not self.user_data.get(f)]
            raise IncompleteEvent(
                "the configured normalizers left out "
                + ", ".join(missing)
                + "; list `business_messaging` and `event_time` in [plugins] normalizers"
            )
        hashed = HASHED_USER_DATA.intersection(self.user_data)
        for key in sorted(hashed) if hashed else ():
            values = self.user_data[key]
            for value in values if isinstance(values, list) else [values]:
                if not (isinstance(value, str) and is_sha256_hex(value)):
                    raise IncompleteEvent(
                        f"user_data.{key} is not a SHA-256 hex digest; a normalizer must hash it"
                    )
        return event

    def _complete(self, event: dict[str, Any]) -> bool:
        """Whether every required field is set (the common case, checked without lists)."""
        for field in REQUIRED_FIELDS:
            value = event.get(field)
            if value is None or value == "":
                return False
        user_data = self.user_data
        return all(user_data.get(field) for field in _REQUIRED_USER_DATA)
