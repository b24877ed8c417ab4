"""The usage ledger: GPU-seconds and US dollars per user, server, UTC day, GPU type and backend.

Stored through SQLAlchemy 2 (SQLite by default, PostgreSQL by URL). Two tables:

- ``dolab_usage``: one row per ``(user, server, day, gpu_type, backend)`` with ``gpu_seconds`` and ``cost_usd``;
  a period's usage is the sum of its days (:mod:`.periods`);
- ``dolab_usage_watermark``: per server, the run it belongs to (the hub's ``started`` time) and the instant up to
  which that run is accounted.

**Never twice.** :meth:`UsageLedger.account` books, for each running server, the interval from its watermark (or
from the run's start, for a run the ledger has not seen) up to now (the increments are the pure
:func:`usage_increments` of the watermarks it read), and moves the watermark, in one transaction:
the increments and the new watermark are committed together or not at all. A monitor restart, a tick that times
out after all, or a second tick with the same ``now`` finds the watermark already moved and books nothing again.
Time the monitor was down is booked at its next tick (the hub still lists the run with its start time); only the
tail of a run that ended while the monitor was down is lost, as the hub no longer says when it stopped.

One monitor writes a ledger, but a second writer (a monitor started twice by mistake) cannot double count either:
a watermark moves only from the value the transaction read (compare and set), so the writer that loses a race
books nothing (:class:`LedgerConflict`) and tries again at its next tick.

The class is synchronous (it is SQLAlchemy's sync engine); :class:`AsyncLedger` runs it in a bounded thread pool
with a timeout, off the event loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, TypeVar

from sqlalchemy import Date, Float, Index, String, UniqueConstraint, create_engine, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .periods import PERIODS, Period, period_start, split_by_day, utc_day
from .quotas import Metric

__all__ = [
    "AsyncLedger",
    "Booking",
    "Charge",
    "Increments",
    "LedgerConflict",
    "UsageKey",
    "UsageLedger",
    "WatermarkMove",
    "database_url",
    "usage_increments",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Base(DeclarativeBase):
    pass


class LedgerConflict(Exception):
    """Another writer moved a watermark while this booking was computed: nothing was booked; try again."""


class UsageRow(_Base):
    """GPU-seconds and cost of one server on one UTC day, for one GPU type and backend."""

    __tablename__ = "dolab_usage"
    __table_args__ = (
        UniqueConstraint("user_name", "server", "day", "gpu_type", "backend", name="uq_dolab_usage"),
        Index("ix_dolab_usage_user_day", "user_name", "day"),
        Index("ix_dolab_usage_day", "day"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_name: Mapped[str] = mapped_column(String(255))
    server: Mapped[str] = mapped_column(String(255))
    day: Mapped[date] = mapped_column(Date)
    gpu_type: Mapped[str] = mapped_column(String(255))
    backend: Mapped[str] = mapped_column(String(64))
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)


class Watermark(_Base):
    """Up to when (epoch seconds) one run of a server is accounted."""

    __tablename__ = "dolab_usage_watermark"

    user_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    server: Mapped[str] = mapped_column(String(255), primary_key=True)
    run_started: Mapped[str] = mapped_column(String(64))
    accounted_until: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class Charge:
    """One running server as the ledger bills it.

    ``run`` identifies this run of the server (the hub's ``started`` timestamp); ``started`` is the same as epoch
    seconds. ``gpus`` maps a GPU type to how many of them the server holds; ``usd_per_hour`` is what the whole
    server costs per hour (RunPod's price, or the local price per GPU-hour times its GPUs).
    """

    user: str
    server: str
    run: str
    started: float
    backend: str
    gpus: Mapping[str, int] = field(default_factory=dict)
    usd_per_hour: float = 0.0

    @property
    def gpu_count(self) -> int:
        """How many GPUs the server holds."""
        return sum(self.gpus.values())

    @property
    def metered(self) -> bool:
        """Whether it uses something a quota counts (GPUs or money)."""
        return self.gpu_count > 0 or self.usd_per_hour > 0


@dataclass(frozen=True)
class Booking:
    """What one :meth:`UsageLedger.account` call booked for one server."""

    user: str
    server: str
    backend: str
    seconds: float
    gpu_seconds: Mapping[str, float]
    cost_usd: float


#: A usage row's key: ``(user, server, UTC day, GPU type, backend)``.
UsageKey = tuple[str, str, date, str, str]


@dataclass(frozen=True)
class WatermarkMove:
    """A server's watermark moving to ``until`` for ``charge``'s run, from ``previous`` (``(run, until)``; None
    when the ledger has not seen the server)."""

    charge: Charge
    previous: tuple[str, float] | None
    until: float


@dataclass(frozen=True)
class Increments:
    """What one accounting step adds: GPU-seconds and USD per usage row, the watermarks it moves, the bookings."""

    usage: Mapping[UsageKey, tuple[float, float]]
    moves: Sequence[WatermarkMove]
    bookings: Sequence[Booking]


def usage_increments(
    charges: Iterable[Charge], watermarks: Mapping[tuple[str, str], tuple[str, float]], now: float
) -> Increments:
    """The increments that book every metered charge from its watermark up to ``now`` (epoch seconds). Pure.

    ``watermarks`` maps ``(user, server)`` to ``(run, accounted_until)``. A charge books from its run's start,
    or from its watermark when the watermark belongs to the same run; nothing when that is not before ``now``.
    Time is split at UTC midnight; a server's cost is shared among its GPU types by their count, and a server
    without GPUs that costs money books under the type ``cpu``.
    """
    usage: dict[UsageKey, list[float]] = defaultdict(lambda: [0.0, 0.0])
    moves: list[WatermarkMove] = []
    bookings: list[Booking] = []
    for charge in charges:
        if not charge.metered:
            continue
        mark = watermarks.get((charge.user, charge.server))
        begin = charge.started
        if mark is not None and mark[0] == charge.run:
            begin = max(begin, mark[1])
        if now <= begin:
            continue
        gpu_seconds, cost = _book_interval(charge, begin, now, usage)
        moves.append(WatermarkMove(charge, mark, now))
        bookings.append(Booking(charge.user, charge.server, charge.backend, now - begin, gpu_seconds, cost))
    return Increments({key: (gpu_s, usd) for key, (gpu_s, usd) in usage.items()}, moves, bookings)


def _book_interval(
    charge: Charge, begin: float, end: float, usage: dict[UsageKey, list[float]]
) -> tuple[dict[str, float], float]:
    """Add ``charge``'s ``begin``..``end`` to ``usage``, day by day; its GPU-seconds by GPU type, and its cost."""
    gpu_seconds: dict[str, float] = defaultdict(float)
    cost = 0.0
    types = dict(charge.gpus) or {"cpu": 0}
    for day, seconds in split_by_day(begin, end):
        day_cost = charge.usd_per_hour * seconds / 3600
        cost += day_cost
        for gpu_type, n in types.items():
            share = n / charge.gpu_count if charge.gpu_count else 1.0
            row = usage[(charge.user, charge.server, day, gpu_type, charge.backend)]
            row[0] += n * seconds
            row[1] += day_cost * share
            gpu_seconds[gpu_type] += n * seconds
    return gpu_seconds, cost


def database_url(url: str) -> str:
    """``url`` with a PostgreSQL driver that is installed: psycopg (3) when psycopg2 is not there."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
                return "postgresql+psycopg://" + url[len(prefix) :]
            return "postgresql://" + url[len(prefix) :]
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: the page's reads do not wait for a tick's write; busy_timeout: a writer waits instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class UsageLedger:
    """The ledger in the database at ``url`` (tables created when missing). Blocking: see :class:`AsyncLedger`."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = database_url(url)
        if engine is None:
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if self.url.startswith("postgresql"):
                kwargs["connect_args"] = {"connect_timeout": 10}
            engine = create_engine(self.url, **kwargs)
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", _sqlite_pragmas)
        self.engine = engine
        _Base.metadata.create_all(engine)

    def close(self) -> None:
        """Close the database connections."""
        self.engine.dispose()

    # ----- booking -------------------------------------------------------------------------------------

    def account(self, charges: Iterable[Charge], now: float) -> list[Booking]:
        """Book every charge's unaccounted time up to ``now`` (epoch seconds), atomically; what was booked.

        The increments are :func:`usage_increments` of the watermarks read in the same transaction. Raises
        :class:`LedgerConflict` (and books nothing) when another writer moved a watermark meanwhile, or the
        database's error when it refuses the transaction.
        """
        charges = [c for c in charges if c.metered]
        if not charges:
            return []
        users = sorted({c.user for c in charges})
        with Session(self.engine) as session, session.begin():
            step = usage_increments(charges, self._watermarks(session, users), now)
            for move in step.moves:
                self._move_watermark(session, move)
            if step.usage:
                self._add_usage(session, users, step.usage)
        return list(step.bookings)

    @staticmethod
    def _watermarks(session: Session, users: Sequence[str]) -> dict[tuple[str, str], tuple[str, float]]:
        """``(user, server) -> (run, accounted_until)`` of ``users``' servers."""
        return {
            (user, server): (run, until)
            for user, server, run, until in session.execute(
                select(Watermark.user_name, Watermark.server, Watermark.run_started, Watermark.accounted_until).where(
                    Watermark.user_name.in_(users)
                )
            )
        }

    @staticmethod
    def _move_watermark(session: Session, move: WatermarkMove) -> None:
        """Move one watermark, only from the value read before (compare and set): a writer that lost a race
        matches no row and raises :class:`LedgerConflict`, so its whole transaction is rolled back and no interval
        is booked twice."""
        charge = move.charge
        if move.previous is None:
            session.add(
                Watermark(
                    user_name=charge.user, server=charge.server, run_started=charge.run, accounted_until=move.until
                )
            )
            try:
                session.flush()
            except IntegrityError:
                raise LedgerConflict(f"another writer booked {charge.user}/{charge.server} first") from None
            return
        moved = session.execute(
            update(Watermark)
            .where(
                Watermark.user_name == charge.user,
                Watermark.server == charge.server,
                Watermark.run_started == move.previous[0],
                Watermark.accounted_until == move.previous[1],
            )
            .values(run_started=charge.run, accounted_until=move.until)
        )
        if getattr(moved, "rowcount", 1) != 1:
            raise LedgerConflict(f"another writer booked {charge.user}/{charge.server} meanwhile")

    @staticmethod
    def _add_usage(session: Session, users: Sequence[str], usage: Mapping[UsageKey, tuple[float, float]]) -> None:
        """Add the increments to their usage rows, creating the rows a day or GPU type did not have yet."""
        days = sorted({key[2] for key in usage})
        existing = {
            (user, server, day, gpu_type, backend): row_id
            for row_id, user, server, day, gpu_type, backend in session.execute(
                select(
                    UsageRow.id, UsageRow.user_name, UsageRow.server, UsageRow.day, UsageRow.gpu_type, UsageRow.backend
                ).where(UsageRow.user_name.in_(users), UsageRow.day.in_(days))
            )
        }
        for key, (gpu_s, usd) in usage.items():
            row_id = existing.get(key)
            if row_id is None:
                user, server, day, gpu_type, backend = key
                session.add(
                    UsageRow(
                        user_name=user,
                        server=server,
                        day=day,
                        gpu_type=gpu_type,
                        backend=backend,
                        gpu_seconds=gpu_s,
                        cost_usd=usd,
                    )
                )
            else:  # an increment in SQL, not a value computed here from an earlier read
                session.execute(
                    update(UsageRow)
                    .where(UsageRow.id == row_id)
                    .values(gpu_seconds=UsageRow.gpu_seconds + gpu_s, cost_usd=UsageRow.cost_usd + usd)
                )

    # ----- reading -------------------------------------------------------------------------------------

    def period_usage(self, users: Iterable[str] | None, now: datetime) -> dict[str, dict[Period, dict[Metric, float]]]:
        """``{user: {period: {"gpu_hours": h, "usd": d}}}`` for the periods containing ``now`` (None: every user)."""
        starts = {p: period_start(p, now).date() for p in PERIODS}
        since = min(starts.values())
        query = (
            select(UsageRow.user_name, UsageRow.day, func.sum(UsageRow.gpu_seconds), func.sum(UsageRow.cost_usd))
            .where(UsageRow.day >= since)
            .group_by(UsageRow.user_name, UsageRow.day)
        )
        if users is not None:
            wanted = sorted(set(users))
            if not wanted:
                return {}
            query = query.where(UsageRow.user_name.in_(wanted))
        result: dict[str, dict[Period, dict[Metric, float]]] = {}
        with Session(self.engine) as session:
            for user, day, gpu_seconds, usd in session.execute(query):
                periods = result.setdefault(user, {p: {"gpu_hours": 0.0, "usd": 0.0} for p in PERIODS})
                for period, start in starts.items():
                    if day >= start:
                        periods[period]["gpu_hours"] += float(gpu_seconds or 0) / 3600
                        periods[period]["usd"] += float(usd or 0)
        return result

    def daily(self, user: str | None, days: int, now: datetime) -> list[dict[str, Any]]:
        """The last ``days`` UTC days up to today, oldest first: ``{"day", "gpu_hours", "usd"}`` (None: everyone)."""
        today = utc_day(now)
        first = today - timedelta(days=days - 1)
        query = (
            select(UsageRow.day, func.sum(UsageRow.gpu_seconds), func.sum(UsageRow.cost_usd))
            .where(UsageRow.day >= first)
            .group_by(UsageRow.day)
        )
        if user is not None:
            query = query.where(UsageRow.user_name == user)
        found: dict[date, tuple[float, float]] = {}
        with Session(self.engine) as session:
            for day, gpu_seconds, usd in session.execute(query):
                found[day] = (float(gpu_seconds or 0) / 3600, float(usd or 0))
        out = []
        for i in range(days):
            day = first + timedelta(days=i)
            gpu_hours, usd = found.get(day, (0.0, 0.0))
            out.append({"day": day.isoformat(), "gpu_hours": gpu_hours, "usd": usd})
        return out

    def breakdown(self, user: str | None, since: date) -> list[dict[str, Any]]:
        """Usage since ``since`` by user, server, GPU type and backend, largest cost and GPU use first."""
        query = (
            select(
                UsageRow.user_name,
                UsageRow.server,
                UsageRow.gpu_type,
                UsageRow.backend,
                func.sum(UsageRow.gpu_seconds),
                func.sum(UsageRow.cost_usd),
            )
            .where(UsageRow.day >= since)
            .group_by(UsageRow.user_name, UsageRow.server, UsageRow.gpu_type, UsageRow.backend)
        )
        if user is not None:
            query = query.where(UsageRow.user_name == user)
        with Session(self.engine) as session:
            rows = [
                {
                    "user": u,
                    "server": s,
                    "gpu_type": t,
                    "backend": b,
                    "gpu_hours": float(g or 0) / 3600,
                    "usd": float(c or 0),
                }
                for u, s, t, b, g, c in session.execute(query)
            ]
        return sorted(rows, key=lambda r: (-r["usd"], -r["gpu_hours"], r["user"], r["server"]))

    def watermark(self, user: str, server: str) -> tuple[str, float] | None:
        """``(run, accounted_until)`` of a server, if the ledger has seen it."""
        with Session(self.engine) as session:
            mark = session.get(Watermark, (user, server))
            return (mark.run_started, mark.accounted_until) if mark is not None else None


class AsyncLedger:
    """A :class:`UsageLedger` used from the event loop: every call in a bounded pool, with a timeout."""

    def __init__(self, ledger: UsageLedger, *, workers: int = 2, timeout_seconds: float = 30) -> None:
        self.ledger = ledger
        self.timeout_seconds = timeout_seconds
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dolab-monitor-db")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the pool; asyncio.TimeoutError after ``timeout_seconds`` (the thread finishes alone)."""
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self._pool, fn, *args), self.timeout_seconds)

    async def account(self, charges: Sequence[Charge], now: float) -> list[Booking]:
        """See :meth:`UsageLedger.account`."""
        return await self.call(self.ledger.account, charges, now)

    async def period_usage(
        self, users: Iterable[str] | None, now: datetime
    ) -> dict[str, dict[Period, dict[Metric, float]]]:
        """See :meth:`UsageLedger.period_usage`."""
        return await self.call(self.ledger.period_usage, None if users is None else list(users), now)

    async def daily(self, user: str | None, days: int, now: datetime) -> list[dict[str, Any]]:
        """See :meth:`UsageLedger.daily`."""
        return await self.call(self.ledger.daily, user, days, now)

    async def breakdown(self, user: str | None, since: date) -> list[dict[str, Any]]:
        """See :meth:`UsageLedger.breakdown`."""
        return await self.call(self.ledger.breakdown, user, since)

    def close(self) -> None:
        """Let the pool go and close the database connections."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.ledger.close()


def epoch(when: datetime) -> float:
    """An aware datetime (naive: UTC) as epoch seconds."""
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
