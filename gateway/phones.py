"""Phone numbers as people type them, and the forms WhatsApp stores for the same person.

Validation uses Google's numbering plans (``phonenumbers``): a number that cannot exist is
refused. Matching then tries the equivalent forms WhatsApp ids take for the same subscriber
(META.md §3b), against stored conversations only; a stored id is never rewritten:

- Mexico: ``52`` + 10 digits (dialled since 2019) and ``521`` + 10 digits (older WhatsApp ids);
- Argentina: ``549`` + 10 digits (WhatsApp ids of mobiles) and ``54`` + 10 digits (how people
  and CRMs often write them);
- Brazil: mobiles with and without the ninth digit (``55`` + area + ``9`` + 8 digits, and the
  8-digit form of accounts older than the ninth digit). Only mobiles: a landline (an 8-digit
  number starting 2-5) has no ninth-digit form.
"""

from __future__ import annotations

import functools
import re

import msgspec
import phonenumbers

from gateway.errors import InvalidRequest

__all__ = ["PhoneForms", "invalid_phone", "parse_phone", "phone_digits"]


def invalid_phone(param: str = "phoneE164") -> InvalidRequest:
    """Return the 400 for a phone number that cannot exist."""
    return InvalidRequest(
        f"Invalid `{param}`: not a number that can exist. Send it with its country code, e.g."
        " +1 650 555 1234 or 5215512345678 (a leading + or 00, spaces, dashes and brackets are"
        " fine).",
        code="invalid_phone",
        param=param,
    )


# What people type around digits; anything else (letters) makes it not a phone number.
_SEPARATORS = re.compile(r"[\s\-().\u00a0/\u2010-\u2015]")


class PhoneForms(msgspec.Struct, frozen=True, kw_only=True):
    """A number as sent (digits, country code first), and the forms to look it up by."""

    digits: str
    # (digits, which form), the number as sent first.
    forms: tuple[tuple[str, str], ...]
    # False: not even parseable as a number (so no form can be valid).
    parsed: bool = True

    @property
    def valid(self) -> bool:
        """Whether the number, or one of its forms, exists in its numbering plan.

        Computed when asked (a resolver asks only when no stored conversation matched): it
        costs a numbering-plan match per form, about as much as the rest of a request.
        """
        return self.parsed and any(_valid(form) for form, _ in self.forms)


def _forms(country: int, national: str) -> list[tuple[str, str]]:
    """Return the WhatsApp-equivalent forms of a number (without the one sent)."""
    cc = str(country)
    if country == 52:
        if len(national) == 11 and national.startswith("1"):
            return [(cc + national[1:], "mexico_without_1")]
        if len(national) == 10:
            return [(cc + "1" + national, "mexico_with_1")]
    if country == 54:
        if len(national) == 11 and national.startswith("9"):
            return [(cc + national[1:], "argentina_without_9")]
        if len(national) == 10:
            return [(cc + "9" + national, "argentina_with_9")]
    if country == 55:
        area, subscriber = national[:2], national[2:]
        # Only a mobile's: 9 + 8 digits starting 6-9 (9 3xxx-xxxx is not landline 3xxx-xxxx).
        if len(subscriber) == 9 and subscriber[0] == "9" and subscriber[1] in "6789":
            return [(cc + area + subscriber[1:], "brazil_without_9")]
        if len(subscriber) == 8 and subscriber[0] in "6789":
            return [(cc + area + "9" + subscriber, "brazil_with_9")]
    return []


def _valid(digits: str) -> bool:
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse("+" + digits))
    except phonenumbers.NumberParseException:
        return False


def phone_digits(raw: str) -> str | None:
    """Return the digits of a typed phone number (country code first), or None if it is not
    one: no letters, 7 to 17 digits, ``+``, ``00`` and common separators allowed."""
    cleaned = _SEPARATORS.sub("", raw.strip())
    if cleaned.startswith("+"):
        cleaned = cleaned[1:]
    elif cleaned.startswith("00"):
        cleaned = cleaned[2:]
    if not (cleaned.isascii() and cleaned.isdigit()) or not 7 <= len(cleaned) <= 17:
        return None
    return cleaned


# A pure function of its text with an immutable answer: the same person converting again (a
# lead, then a purchase) skips the numbering plans, which cost as much as the rest of a
# request.
@functools.lru_cache(maxsize=4096)
def parse_phone(raw: str) -> PhoneForms | None:
    """Return the number and its WhatsApp forms, or None if it is not a phone number at all.

    ``+``, ``00``, spaces, dashes, dots, slashes and brackets are fine; the country code is
    required. ``valid`` says whether the number, or one of its WhatsApp forms, is valid in its
    numbering plan (``5215512345678`` is a Mexican WhatsApp id, though Mexico dials it without
    the 1). An invalid one may still be a WhatsApp id as Meta sent it: the resolver tries the
    stored ids first and refuses it only if none matches.
    """
    cleaned = phone_digits(raw)
    if cleaned is None:
        return None
    try:
        number = phonenumbers.parse("+" + cleaned)
    except phonenumbers.NumberParseException:
        return PhoneForms(digits=cleaned, forms=((cleaned, "as_sent"),), parsed=False)
    # The national significant number keeps Italy's leading zero (06...), national_number not.
    national = phonenumbers.national_significant_number(number)
    country = number.country_code or 0
    digits = f"{country}{national}"
    forms = [(digits, "as_sent"), *_forms(country, national)]
    if cleaned != digits:
        forms.append((cleaned, "as_typed"))  # a trunk prefix kept, as a stored id might be
    return PhoneForms(digits=digits, forms=tuple(forms))
