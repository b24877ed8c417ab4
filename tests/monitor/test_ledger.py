"""The usage ledger on SQLite and on a real PostgreSQL: arithmetic, days, periods, and never counting twice."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError, OperationalError

from dolab_services.monitor.ledger import (
    AsyncLedger,
    Charge,
    LedgerConflict,
    UsageLedger,
    WatermarkMove,
    _Base,
    database_url,
    usage_increments,
)

UTC = timezone.utc
A100 = "NVIDIA A100 80GB"
H100 = "NVIDIA H100"


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def when(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh ledger database: a SQLite file, or the session's PostgreSQL with empty tables."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite'}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    engine = create_engine(url)
    _Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[UsageLedger]:
    ledger = UsageLedger(ledger_url)
    yield ledger
    ledger.close()


def charge(
    user: str = "alice",
    server: str = "",
    started: str = "2026-11-26T08:00:00",
    backend: str = "local",
    gpus: dict[str, int] | None = None,
    usd: float = 0.0,
) -> Charge:
    return Charge(user, server, f"{started}Z", at(started), backend, {A100: 1} if gpus is None else gpus, usd)


# ----- the increments step (pure, no database) ---------------------------------------------------------------


def test_increments_of_a_run_the_ledger_has_not_seen() -> None:
    """Booked from the run's start; split at UTC midnight; the cost shared among GPU types by their count."""
    run = charge(started="2026-11-25T23:00:00", gpus={A100: 2, H100: 1}, usd=3.0)
    step = usage_increments([run], {}, at("2026-11-26T01:00:00"))
    nov25, nov26 = when("2026-11-25T00:00:00").date(), when("2026-11-26T00:00:00").date()
    assert step.usage == {
        ("alice", "", nov25, A100, "local"): (7200.0, 2.0),
        ("alice", "", nov25, H100, "local"): (3600.0, 1.0),
        ("alice", "", nov26, A100, "local"): (7200.0, 2.0),
        ("alice", "", nov26, H100, "local"): (3600.0, 1.0),
    }
    assert step.moves == [WatermarkMove(run, None, at("2026-11-26T01:00:00"))]
    [booking] = step.bookings
    assert (booking.seconds, dict(booking.gpu_seconds), booking.cost_usd) == (
        7200.0,
        {A100: 14400.0, H100: 7200.0},
        6.0,
    )


def test_increments_go_on_from_the_watermark_of_the_same_run() -> None:
    run = charge()
    mark = (run.run, at("2026-11-26T08:45:00"))
    step = usage_increments([run], {("alice", ""): mark}, at("2026-11-26T09:00:00"))
    assert [b.seconds for b in step.bookings] == [900.0]
    assert step.moves == [WatermarkMove(run, mark, at("2026-11-26T09:00:00"))]


def test_increments_of_a_new_run_ignore_the_old_runs_watermark() -> None:
    run = charge(started="2026-11-26T08:00:00")
    old = ("2026-11-20T08:00:00Z", at("2026-11-26T08:50:00"))
    step = usage_increments([run], {("alice", ""): old}, at("2026-11-26T09:00:00"))
    assert [b.seconds for b in step.bookings] == [3600.0], "from its own start, not the old run's watermark"
    assert step.moves[0].previous == old, "the watermark moves from the value read (compare and set)"


@pytest.mark.parametrize(
    ("charges", "watermarks"),
    [
        ([charge(gpus={})], {}),  # a free CPU server: not metered
        ([charge(started="2026-11-26T10:00:00")], {}),  # starts after now
        ([charge()], {("alice", ""): ("2026-11-26T08:00:00Z", at("2026-11-26T09:00:00"))}),  # booked up to now
    ],
    ids=["not-metered", "future-start", "already-booked"],
)
def test_increments_that_book_nothing(charges: list[Charge], watermarks: dict) -> None:
    step = usage_increments(charges, watermarks, at("2026-11-26T09:00:00"))
    assert (dict(step.usage), list(step.moves), list(step.bookings)) == ({}, [], [])


def test_a_priced_server_without_gpus_books_money_as_cpu() -> None:
    step = usage_increments([charge(backend="runpod", gpus={}, usd=1.0)], {}, at("2026-11-26T10:00:00"))
    day = when("2026-11-26T00:00:00").date()
    assert step.usage == {("alice", "", day, "cpu", "runpod"): (0.0, 2.0)}


# ----- arithmetic (a table) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("charges", "now", "day_gpu_hours", "day_usd", "week_gpu_hours", "month_usd"),
    [
        # one A100 for one hour, free
        ([charge()], "2026-11-26T09:00:00", 1.0, 0.0, 1.0, 0.0),
        # two GPUs of two types for 30 min, 3 USD/h for the server
        ([charge(gpus={A100: 1, H100: 1}, usd=3.0)], "2026-11-26T08:30:00", 1.0, 1.5, 1.0, 1.5),
        # a RunPod pod at 2.4 USD/h for 15 min, one GPU
        ([charge(backend="runpod", gpus={"RTX 4090": 1}, usd=2.4)], "2026-11-26T08:15:00", 0.25, 0.6, 0.25, 0.6),
        # a priced CPU pod: money, no GPU-hours
        ([charge(backend="runpod", gpus={}, usd=1.0)], "2026-11-26T10:00:00", 0.0, 2.0, 0.0, 2.0),
        # started yesterday 22:00: today holds only the 9 hours since midnight; the week holds all 11
        ([charge(started="2026-11-25T22:00:00")], "2026-11-26T09:00:00", 9.0, 0.0, 11.0, 0.0),
        # started on Sunday 23:00 (last week): Monday 01:00 counts 1 h this week, 2 h this month
        ([charge(started="2026-11-29T23:00:00", usd=1.0)], "2026-11-30T01:00:00", 1.0, 1.0, 1.0, 2.0),
        # started on Nov 30 23:00: Dec 1 01:00 counts 1 h this month, 2 h this week
        ([charge(started="2026-11-30T23:00:00", usd=1.0)], "2026-12-01T01:00:00", 1.0, 1.0, 2.0, 1.0),
        # two servers of the same user add up
        ([charge(), charge(server="b", usd=10.0)], "2026-11-26T09:00:00", 2.0, 10.0, 2.0, 10.0),
        # a CPU server on a local host costs nothing and is not booked
        ([charge(gpus={})], "2026-11-26T09:00:00", 0.0, 0.0, 0.0, 0.0),
        # a server that starts after now books nothing
        ([charge(started="2026-11-26T10:00:00")], "2026-11-26T09:00:00", 0.0, 0.0, 0.0, 0.0),
    ],
    ids=[
        "one-gpu-hour",
        "two-types-priced",
        "runpod",
        "cpu-pod",
        "across-midnight",
        "new-week",
        "new-month",
        "two-servers",
        "local-cpu",
        "future-start",
    ],
)
def test_arithmetic_and_period_resets(
    ledger: UsageLedger,
    charges: list[Charge],
    now: str,
    day_gpu_hours: float,
    day_usd: float,
    week_gpu_hours: float,
    month_usd: float,
) -> None:
    ledger.account(charges, at(now))
    usage = ledger.period_usage(["alice"], when(now)).get("alice")
    if usage is None:
        assert day_gpu_hours == day_usd == week_gpu_hours == month_usd == 0
        return
    assert usage["day"]["gpu_hours"] == pytest.approx(day_gpu_hours)
    assert usage["day"]["usd"] == pytest.approx(day_usd)
    assert usage["week"]["gpu_hours"] == pytest.approx(week_gpu_hours)
    assert usage["month"]["usd"] == pytest.approx(month_usd)


def test_intervals_between_ticks_add_up_to_the_whole_run(ledger: UsageLedger) -> None:
    c = charge(usd=3.6)
    for minute in range(1, 61):  # a tick a minute for an hour
        ledger.account([c], at("2026-11-26T08:00:00") + 60 * minute)
    usage = ledger.period_usage(None, when("2026-11-26T09:00:00"))["alice"]["day"]
    assert usage["gpu_hours"] == pytest.approx(1.0)
    assert usage["usd"] == pytest.approx(3.6)


# ----- never twice -------------------------------------------------------------------------------------------


def test_the_same_interval_is_never_booked_twice(ledger: UsageLedger) -> None:
    c = charge()
    first = ledger.account([c], at("2026-11-26T09:00:00"))
    assert first[0].seconds == 3600
    assert ledger.account([c], at("2026-11-26T09:00:00")) == []  # the same tick again
    assert ledger.account([c], at("2026-11-26T08:30:00")) == []  # a tick from the past (clock step back)
    assert ledger.watermark("alice", "") == (c.run, at("2026-11-26T09:00:00"))
    assert ledger.period_usage(None, when("2026-11-26T09:00:00"))["alice"]["day"]["gpu_hours"] == pytest.approx(1.0)


def test_a_restart_goes_on_from_the_watermark(ledger_url: str) -> None:
    c = charge(usd=1.0)
    first = UsageLedger(ledger_url)
    first.account([c], at("2026-11-26T09:00:00"))
    first.close()
    # The monitor restarts (a new process, the same database) after being down 30 min.
    second = UsageLedger(ledger_url)
    booked = second.account([c], at("2026-11-26T09:30:00"))
    assert [b.seconds for b in booked] == [1800]  # the down time, once; not the run from its start again
    usage = second.period_usage(None, when("2026-11-26T09:30:00"))["alice"]["day"]
    second.close()
    assert usage["gpu_hours"] == pytest.approx(1.5) and usage["usd"] == pytest.approx(1.5)


def test_a_new_run_of_the_same_server_starts_from_its_own_start(ledger: UsageLedger) -> None:
    ledger.account([charge()], at("2026-11-26T09:00:00"))
    # Stopped, then started again at 10:00: 09:00-10:00 is not the server's.
    again = charge(started="2026-11-26T10:00:00")
    booked = ledger.account([again], at("2026-11-26T10:30:00"))
    assert [b.seconds for b in booked] == [1800]
    assert ledger.period_usage(None, when("2026-11-26T10:30:00"))["alice"]["day"]["gpu_hours"] == pytest.approx(1.5)


def test_a_failed_booking_books_nothing(ledger: UsageLedger) -> None:
    good, bad = charge(), charge(user="bob")
    # A row the database refuses (a NULL GPU type) fails the whole transaction: good's watermark does not move.
    broken = Charge("bob", "", bad.run, bad.started, "local", {None: 1})  # type: ignore[dict-item]
    with pytest.raises(IntegrityError):
        ledger.account([good, broken], at("2026-11-26T09:00:00"))
    assert ledger.watermark("alice", "") is None
    assert ledger.account([good], at("2026-11-26T09:00:00"))[0].seconds == 3600


def test_two_monitors_at_once_never_book_an_interval_twice(ledger_url: str) -> None:
    """Two writers racing on the same servers: each interval ends up booked at most once."""
    ledgers = [UsageLedger(ledger_url), UsageLedger(ledger_url)]
    charges = [charge(user=f"u{i}") for i in range(5)]
    errors: list[BaseException] = []

    def run(ledger: UsageLedger, offset: float) -> None:
        for minute in range(1, 31):
            try:
                ledger.account(charges, at("2026-11-26T08:00:00") + 60 * minute + offset)
            except LedgerConflict as e:  # lost a race: that transaction booked nothing
                errors.append(e)
            except OperationalError as e:  # SQLite: the other writer held the lock too long
                errors.append(e)

    threads = [threading.Thread(target=run, args=(ledger, i / 2)) for i, ledger in enumerate(ledgers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    usage = ledgers[0].period_usage(None, when("2026-11-26T09:00:00"))
    for ledger in ledgers:
        ledger.close()
    for i in range(5):
        hours = usage[f"u{i}"]["day"]["gpu_hours"]
        assert hours * 3600 <= 30 * 60 + 0.5 + 1e-6, f"u{i} booked {hours * 3600:.0f} s in a 1,800.5 s window"
        assert hours * 3600 >= 29 * 60, f"u{i}: the racing writers booked too little"


# ----- reading -----------------------------------------------------------------------------------------------


def test_daily_and_breakdown(ledger: UsageLedger) -> None:
    alice = charge(started="2026-11-24T23:00:00", usd=1.0)
    bob = charge(user="bob", server="x", started="2026-11-25T12:00:00")
    ledger.account([alice, bob], at("2026-11-26T01:00:00"))
    daily = ledger.daily("alice", 3, when("2026-11-26T01:00:00"))
    assert [d["day"] for d in daily] == ["2026-11-24", "2026-11-25", "2026-11-26"]
    assert [round(d["gpu_hours"], 6) for d in daily] == [1.0, 24.0, 1.0]
    assert sum(d["usd"] for d in daily) == pytest.approx(26.0)
    everyone = ledger.daily(None, 1, when("2026-11-26T01:00:00"))
    assert everyone[0]["gpu_hours"] == pytest.approx(1.0 + 1.0)
    rows = ledger.breakdown(None, when("2026-11-01T00:00:00").date())
    assert [(r["user"], r["server"], r["gpu_type"], r["backend"]) for r in rows] == [
        ("alice", "", A100, "local"),
        ("bob", "x", A100, "local"),
    ]
    assert rows[0]["usd"] == pytest.approx(26.0) and rows[1]["gpu_hours"] == pytest.approx(13.0)


async def test_the_async_ledger_runs_off_the_event_loop(ledger: UsageLedger) -> None:
    wrapped = AsyncLedger(ledger, workers=1, timeout_seconds=30)
    loop_thread = threading.get_ident()
    seen: list[int] = []
    assert await wrapped.call(lambda: seen.append(threading.get_ident()) or 1) == 1
    assert seen and seen[0] != loop_thread
    await wrapped.account([charge()], at("2026-11-26T09:00:00"))
    usage = await wrapped.period_usage(["alice"], when("2026-11-26T09:00:00"))
    assert usage["alice"]["day"]["gpu_hours"] == pytest.approx(1.0)
    slow = AsyncLedger(ledger, workers=1, timeout_seconds=0.05)
    with pytest.raises(asyncio.TimeoutError):
        await slow.call(threading.Event().wait, 1)


@pytest.mark.parametrize(
    ("url", "expected_prefix"),
    [
        ("sqlite:///x.db", "sqlite:///"),
        ("postgresql://u@h/db", "postgresql"),
        ("postgres://u@h/db", "postgresql"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://"),
    ],
)
def test_database_url(url: str, expected_prefix: str) -> None:
    assert database_url(url).startswith(expected_prefix)


def test_a_day_split_is_exact_at_week_boundaries(ledger: UsageLedger) -> None:
    # Sunday 12:00 to Monday 12:00: the new week holds exactly the Monday half.
    ledger.account([charge(started="2026-11-29T12:00:00")], at("2026-11-30T12:00:00"))
    monday = when("2026-11-30T12:00:00")
    usage = ledger.period_usage(None, monday)["alice"]
    assert usage["week"]["gpu_hours"] == pytest.approx(12.0)
    assert usage["month"]["gpu_hours"] == pytest.approx(24.0)
    assert ledger.period_usage(None, monday + timedelta(days=1))["alice"]["day"]["gpu_hours"] == 0
