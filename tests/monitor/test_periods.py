"""Unit tests for dolab_services.monitor.periods: UTC boundaries, Monday weeks, months, splitting at midnight."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from dolab_services.monitor.periods import period_bounds, period_start, split_by_day

UTC = timezone.utc


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC) if "+" not in text else datetime.fromisoformat(text)


@pytest.mark.parametrize(
    ("period", "now", "start", "reset"),
    [
        ("day", "2026-11-26T08:30:00", "2026-11-26T00:00:00", "2026-11-27T00:00:00"),
        ("day", "2026-11-26T00:00:00", "2026-11-26T00:00:00", "2026-11-27T00:00:00"),
        ("day", "2026-11-26T23:59:59.999999", "2026-11-26T00:00:00", "2026-11-27T00:00:00"),
        ("week", "2026-11-26T08:30:00", "2026-11-23T00:00:00", "2026-11-30T00:00:00"),  # a Thursday
        ("week", "2026-11-23T00:00:00", "2026-11-23T00:00:00", "2026-11-30T00:00:00"),  # Monday midnight
        ("week", "2026-11-29T23:59:59", "2026-11-23T00:00:00", "2026-11-30T00:00:00"),  # Sunday night
        ("week", "2026-12-31T12:00:00", "2026-12-28T00:00:00", "2027-01-04T00:00:00"),  # across the new year
        ("month", "2026-11-26T08:30:00", "2026-11-01T00:00:00", "2026-12-01T00:00:00"),
        ("month", "2026-12-31T23:00:00", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
        ("month", "2028-02-29T12:00:00", "2028-02-01T00:00:00", "2028-03-01T00:00:00"),  # leap year
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 8 else None,
)
def test_period_bounds_are_utc_midnights(period: str, now: str, start: str, reset: str) -> None:
    assert period_bounds(period, at(now)) == (at(start), at(reset))  # type: ignore[arg-type]
    assert period_start(period, at(now)) == at(start)  # type: ignore[arg-type]


def test_a_time_in_another_zone_is_read_in_utc() -> None:
    # 00:30 in Paris (UTC+1) on Monday is still Sunday in UTC: the week started the Monday before.
    paris = datetime(2026, 11, 30, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    assert period_start("week", paris) == at("2026-11-23T00:00:00")
    assert period_start("day", paris) == at("2026-11-29T00:00:00")


def test_an_unknown_period_is_refused() -> None:
    with pytest.raises(ValueError, match="period must be one of day, week, month"):
        period_start("year", at("2026-11-26T00:00:00"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("begin", "end", "expected"),
    [
        ("2026-11-26T08:00:00", "2026-11-26T09:00:00", [(date(2026, 11, 26), 3600.0)]),
        ("2026-11-26T23:30:00", "2026-11-27T00:45:00", [(date(2026, 11, 26), 1800.0), (date(2026, 11, 27), 2700.0)]),
        (
            "2026-11-29T22:00:00",
            "2026-12-01T02:00:00",
            [(date(2026, 11, 29), 7200.0), (date(2026, 11, 30), 86400.0), (date(2026, 12, 1), 7200.0)],
        ),
        ("2026-11-27T00:00:00", "2026-11-27T00:00:00", []),
        ("2026-11-27T01:00:00", "2026-11-27T00:00:00", []),
        ("2026-11-26T23:00:00", "2026-11-27T00:00:00", [(date(2026, 11, 26), 3600.0)]),
    ],
    ids=["one-hour", "across-midnight", "three-days", "empty", "reversed", "ends-at-midnight"],
)
def test_split_by_day(begin: str, end: str, expected: list[tuple[date, float]]) -> None:
    parts = list(split_by_day(at(begin).timestamp(), at(end).timestamp()))
    assert parts == expected
    assert sum(s for _, s in parts) == pytest.approx(max(0.0, at(end).timestamp() - at(begin).timestamp()))
