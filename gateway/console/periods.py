"""The console's period picker (24 h, 7 d, 30 d or two dates) as the API's since/until."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec

from gateway.errors import InvalidRequest
from gateway.http.query import QueryStruct
from gateway.http.render import iso_time
from gateway.reports import DAY_S, MAX_PERIOD_S, parse_time

__all__ = ["PERIODS", "PeriodQuery", "since_until"]

PERIODS = {"24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
DateParam = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d{2}-\d{2}\Z")]


class PeriodQuery(QueryStruct, frozen=True):
    """A page's period: ``period`` 24h, 7d, 30d, or custom with ``start`` and ``end`` days
    (both included, UTC)."""

    period: Literal["24h", "7d", "30d", "custom"] = "7d"
    start: DateParam | None = None
    end: DateParam | None = None


def since_until(query: PeriodQuery, *, now: float) -> tuple[str, str | None]:
    """Return the API's ``since`` and ``until`` for a page's period (400 for bad dates)."""
    if query.period != "custom":
        return iso_time(int(now) + 1 - PERIODS[query.period]), None
    if query.start is None or query.end is None:
        raise InvalidRequest(
            "A custom period needs both `start` and `end` dates (YYYY-MM-DD).",
            code="missing_field",
            param="start" if query.start is None else "end",
        )
    # Checked here, naming the form's fields: the API's own checks would name `since`/`until`.
    start = parse_time(query.start, "start")
    end = parse_time(query.end, "end") + DAY_S
    if end <= start:
        raise InvalidRequest(
            "The custom period's `end` date (To) is before its `start` date (From); pick a"
            " To date on or after the From date.",
            code="invalid_field",
            param="end",
        )
    if end - start > MAX_PERIOD_S:
        raise InvalidRequest(
            f"The custom period is too long: at most {MAX_PERIOD_S // DAY_S} days from `start`"
            " (From) to `end` (To).",
            code="invalid_field",
            param="start",
        )
    return query.start, datetime.fromtimestamp(end, UTC).strftime("%Y-%m-%d")
