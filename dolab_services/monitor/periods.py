"""Quota periods and how an interval is split into the ledger's days: every boundary is in UTC.

- ``day``: from 00:00 UTC to the next 00:00 UTC;
- ``week``: from Monday 00:00 UTC to the next Monday 00:00 UTC (ISO weeks);
- ``month``: from the 1st 00:00 UTC to the 1st of the next month 00:00 UTC.

A period's usage is the sum of the ledger's days from its start, so an interval of use that crosses midnight is
split at midnight (:func:`split_by_day`) before it is booked.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from typing import Literal, get_args

__all__ = ["PERIODS", "Period", "period_bounds", "period_start", "split_by_day", "utc_day"]

Period = Literal["day", "week", "month"]
#: The periods a quota may use, shortest first.
PERIODS: tuple[Period, ...] = get_args(Period)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def utc_day(when: datetime) -> date:
    """The UTC calendar day of ``when`` (an aware datetime; a naive one is read as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).date()


def period_start(period: Period, now: datetime) -> datetime:
    """When the ``period`` containing ``now`` began (UTC midnight of a day, a Monday or a 1st)."""
    today = utc_day(now)
    if period == "day":
        return _midnight(today)
    if period == "week":
        return _midnight(today - timedelta(days=today.weekday()))
    if period == "month":
        return _midnight(today.replace(day=1))
    raise ValueError(f"period must be one of {', '.join(PERIODS)}, not {period!r}")


def period_bounds(period: Period, now: datetime) -> tuple[datetime, datetime]:
    """``(start, reset)``: the period containing ``now`` and when the next one begins (its quota resets)."""
    start = period_start(period, now)
    if period == "day":
        return start, start + timedelta(days=1)
    if period == "week":
        return start, start + timedelta(days=7)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start, datetime(year, month, 1, tzinfo=timezone.utc)


def split_by_day(begin: float, end: float) -> Iterator[tuple[date, float]]:
    """``(UTC day, seconds)`` for each day the interval ``[begin, end)`` (epoch seconds) touches.

    The seconds add up to ``end - begin`` exactly up to float rounding; an empty or reversed interval gives
    nothing.
    """
    if not end > begin:
        return
    cursor = begin
    while cursor < end:
        day = datetime.fromtimestamp(cursor, timezone.utc).date()
        boundary = _midnight(day + timedelta(days=1)).timestamp()
        step_end = min(end, boundary)
        yield day, step_end - cursor
        cursor = step_end
