"""The monitor's sampling tick, and the views of its state that the page and the API serve.

Every ``--interval`` seconds (default 15) one tick:

1. lists the hub's active servers with their spawner state (one paginated request; ``admin:server_state``);
2. reads the GPUs from the telemetry source (off the event loop, bounded by ``telemetry_timeout_seconds``) and maps
   each GPU to the server whose state holds its slot;
3. books every server's unaccounted time in the ledger (:meth:`~.ledger.UsageLedger.account`, in the ledger's
   thread pool);
4. evaluates the quotas of the users with metered servers and lets the :class:`~.enforcer.QuotaEnforcer` warn
   and stop;
5. updates the metrics, and keeps the last ``history_points`` GPU readings of each server for the plots (in
   memory: the plots start again after a restart, the ledger does not).

A tick that cannot list the hub books nothing (the next one books the whole interval: nothing is lost), and a
failing telemetry source only leaves the readings out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from ..hubclient import HubClient
from .enforcer import QuotaEnforcer
from .ledger import AsyncLedger
from .metrics import MonitorMetrics
from .periods import PERIODS, period_start
from .quotas import QuotaConfig, QuotaStatus, evaluate
from .runs import GpuPrices, ServerRun, server_runs
from .telemetry import GpuReading, TelemetrySource

__all__ = ["Monitor", "TickReport"]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(when: datetime) -> str:
    return when.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class TickReport:
    """What one tick saw and did."""

    servers: int = 0
    gpus_read: int = 0
    booked: int = 0
    quota_users: int = 0
    stops: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


class Monitor:
    """Telemetry, ledger, quotas and metrics for one hub (see the module docstring)."""

    def __init__(
        self,
        hub: HubClient,
        ledger: AsyncLedger,
        source: TelemetrySource,
        enforcer: QuotaEnforcer,
        *,
        quotas: QuotaConfig | None = None,
        prices: GpuPrices | None = None,
        metrics: MonitorMetrics | None = None,
        telemetry_timeout_seconds: float = 10,
        history_points: int = 240,
        log: logging.Logger | None = None,
    ) -> None:
        self.hub = hub
        self.ledger = ledger
        self.source = source
        self.enforcer = enforcer
        self.quotas = quotas or QuotaConfig()
        self.prices = prices or GpuPrices()
        self.metrics = metrics or MonitorMetrics()
        self.telemetry_timeout_seconds = telemetry_timeout_seconds
        self.history_points = history_points
        self.log = log or logging.getLogger("dolab.monitor")
        self.runs: list[ServerRun] = []
        self.readings: list[GpuReading] = []
        self.statuses: dict[str, QuotaStatus] = {}
        self.history: dict[tuple[str, str, str], deque[tuple[float, float | None, float | None]]] = {}
        self.last_tick: datetime | None = None
        self._telemetry_problem = ""

    # ----- the tick ------------------------------------------------------------------------------------

    async def tick(self, now: datetime | None = None) -> TickReport:
        """One sampling tick (at ``now``, for tests; default: the current time).

        Raises :class:`~dolab_services.hubclient.HubAPIError` when the hub cannot be listed (nothing is booked).
        """
        wall, cpu = time.perf_counter(), time.process_time()
        report = TickReport()
        users = [user async for user in self.hub.users(state="active")]
        now = now or _utcnow()
        runs = server_runs(users, self.prices)
        report.servers = len(runs)
        readings = await self._read_gpus()
        report.gpus_read = len(readings)
        self.runs, self.readings = runs, readings
        self._record_history(runs, readings, now)
        await self._book(runs, now, report)
        metered_users = {r.user: r.groups for r in runs if r.metered}
        usage = await self._check_quotas(runs, metered_users, now, report)
        if self.metrics.per_user and not usage and metered_users:
            try:
                usage = await self.ledger.period_usage(metered_users, now)
            except Exception:
                usage = {}
        self.metrics.observe_runs(runs)
        self.metrics.observe_gpus(readings, self.holders().keys())
        warned = sum(1 for ws in self.enforcer.warnings.values() if ws)
        exceeded = sum(1 for s in self.statuses.values() if s.exceeded)
        self.metrics.observe_quotas(warned, exceeded, usage)
        self.last_tick = now
        report.seconds = time.perf_counter() - wall
        report.cpu_seconds = time.process_time() - cpu
        self.metrics.tick_seconds.set(report.seconds)
        self.metrics.tick_cpu_seconds.set(report.cpu_seconds)
        self.metrics.ticks.labels(result="failed" if report.problems else "ok").inc()
        self.log.debug(
            "Tick: %d server(s), %d GPU reading(s), %d booked, %d user(s) with quotas, %d stop(s) (%.3f s, %.3f s CPU)",
            report.servers,
            report.gpus_read,
            report.booked,
            report.quota_users,
            report.stops,
            report.seconds,
            report.cpu_seconds,
        )
        return report

    async def _book(self, runs: Sequence[ServerRun], now: datetime, report: TickReport) -> None:
        """Book the runs' usage up to ``now`` in the ledger; a failure is a problem of the tick, booked next tick."""
        try:
            bookings = await self.ledger.account([r.charge() for r in runs], now.timestamp())
        except Exception as e:  # the database is down or slow: nothing booked, the next tick books it all
            report.problems.append(f"ledger: {e or type(e).__name__}")
            self.log.error("Cannot book usage in the ledger (%s): trying again next tick", e or type(e).__name__)
        else:
            report.booked = len(bookings)
            self.metrics.observe_bookings(bookings)

    async def _check_quotas(
        self,
        runs: Sequence[ServerRun],
        metered_users: Mapping[str, tuple[str, ...]],
        now: datetime,
        report: TickReport,
    ) -> dict[str, Any]:
        """Evaluate the metered users' quotas and let the enforcer warn and stop; the usage read (``{}``: none).

        Quotas are not checked when the tick could not book (the usage would be short)."""
        usage: dict[str, Any] = {}
        if self.quotas.empty or not metered_users:
            self.statuses = {}
            self.enforcer.apply({}, runs, now)
        elif not report.problems:
            try:
                usage = await self.ledger.period_usage(metered_users, now)
            except Exception as e:
                report.problems.append(f"ledger: {e or type(e).__name__}")
                self.log.error("Cannot read usage from the ledger (%s): quotas not checked", e or type(e).__name__)
            else:
                statuses = {}
                for user, groups in metered_users.items():
                    quota = self.quotas.for_user(user, groups)
                    if quota:
                        statuses[user] = evaluate(user, quota, usage.get(user, {}), now)
                self.statuses = statuses
                report.quota_users = len(statuses)
                report.stops = self.enforcer.apply(statuses, runs, now)
        return usage

    async def _read_gpus(self) -> list[GpuReading]:
        try:
            readings = await asyncio.wait_for(self.source.read(), self.telemetry_timeout_seconds)
        except Exception as e:
            text = "no answer in time" if isinstance(e, asyncio.TimeoutError) else str(e) or type(e).__name__
            if text != self._telemetry_problem:
                self.log.warning("Cannot read the GPUs (%s): no GPU readings this tick", text)
            self._telemetry_problem = text
            return []
        self._telemetry_problem = ""
        return list(readings)

    def holders(self) -> dict[str, tuple[str, str]]:
        """GPU uuid -> ``(user, server)`` holding its slot, from the last tick's spawner states."""
        return {str(slot["uuid"]): run.key for run in self.runs for slot in run.slots}

    def _record_history(self, runs: Sequence[ServerRun], readings: Sequence[GpuReading], now: datetime) -> None:
        by_uuid = {r.uuid: r for r in readings}
        alive = set()
        for run in runs:
            if not run.gpus:
                continue
            key = (run.user, run.server, run.run)
            alive.add(key)
            held = [by_uuid[str(s["uuid"])] for s in run.slots if str(s["uuid"]) in by_uuid]
            utilisation = _mean([r.utilization_percent for r in held if r.utilization_percent is not None])
            if utilisation is None:
                utilisation = run.gpu_utilization_percent
            memory = [r.memory_used_gb for r in held if r.memory_used_gb is not None]
            series = self.history.setdefault(key, deque(maxlen=self.history_points))
            series.append((now.timestamp(), utilisation, sum(memory) if memory else None))
        for key in list(self.history):
            if key not in alive:
                del self.history[key]

    # ----- views ---------------------------------------------------------------------------------------

    async def groups_of(self, user: str) -> list[str]:
        """The user's groups, from the last tick when they have a server there, else from the hub."""
        for run in self.runs:
            if run.user == user:
                return list(run.groups)
        model = await self.hub.request("GET", f"/users/{quote(user, safe='')}")
        return [str(g) for g in (model or {}).get("groups") or ()]

    async def quota_status(
        self, user: str, groups: Sequence[str] | None = None, now: datetime | None = None
    ) -> QuotaStatus:
        """The user's quota against their usage now (read fresh from the ledger)."""
        now = now or _utcnow()
        if groups is None:
            groups = await self.groups_of(user)
        quota = self.quotas.for_user(user, groups)
        usage = (await self.ledger.period_usage([user], now)).get(user, {}) if quota else {}
        return evaluate(user, quota, usage, now)

    def _gpu_rows(self) -> list[dict[str, Any]]:
        holders = self.holders()
        rows = []
        seen = set()
        for r in sorted(self.readings, key=lambda r: (r.host, r.index if r.index is not None else -1, r.uuid)):
            seen.add(r.uuid)
            holder = holders.get(r.uuid)
            row = r.to_json()
            row["holder"] = f"{holder[0]}/{holder[1]}" if holder else ""
            row["unattributed_processes"] = len(r.processes) if holder is None else 0
            rows.append(row)
        for run in self.runs:  # held GPUs the source does not see (another host, a source that failed)
            for slot in run.slots:
                if str(slot["uuid"]) not in seen:
                    seen.add(str(slot["uuid"]))
                    rows.append(
                        {
                            "uuid": str(slot["uuid"]),
                            "host": str(slot.get("host") or run.host),
                            "index": slot.get("index"),
                            "name": str(slot.get("name") or ""),
                            "holder": f"{run.user}/{run.server}",
                            "utilization_percent": None,
                            "processes": [],
                            "unattributed_processes": 0,
                        }
                    )
        return rows

    def _server_json(self, run: ServerRun) -> dict[str, Any]:
        series = self.history.get((run.user, run.server, run.run)) or ()
        last = series[-1] if series else None
        return {
            "user": run.user,
            "server": run.server,
            "profile": run.profile,
            "backend": run.backend,
            "host": run.host,
            "started": _stamp(run.started),
            "ready": run.ready,
            "gpus": dict(run.gpus),
            "gpu_uuids": [str(s["uuid"]) for s in run.slots],
            "usd_per_hour": run.usd_per_hour,
            "utilization_percent": last[1] if last else None,
            "memory_used_gb": last[2] if last else None,
            "history": [{"t": t, "utilization_percent": u, "memory_used_gb": m} for t, u, m in series],
        }

    async def user_view(self, user: str, now: datetime | None = None) -> dict[str, Any]:
        """Everything the page and ``api/usage`` show one user: servers, usage, spend, quota, warnings, stops."""
        now = now or _utcnow()
        status = await self.quota_status(user, now=now)
        usage = (await self.ledger.period_usage([user], now)).get(user) or {
            p: {"gpu_hours": 0.0, "usd": 0.0} for p in PERIODS
        }
        return {
            "user": user,
            "at": _stamp(now),
            "last_tick": _stamp(self.last_tick) if self.last_tick else None,
            "servers": [self._server_json(r) for r in self.runs if r.user == user],
            "usage": usage,
            "daily": await self.ledger.daily(user, 30, now),
            "breakdown": await self.ledger.breakdown(user, period_start("month", now).date()),
            "quota": {
                "source": status.quota.source,
                "allowed": not status.exceeded,
                "message": status.refusal() or status.summary(),
                "limits": [s.to_json() for s in status.limits],
            },
            "warnings": [w.to_json() for w in self.enforcer.warnings.get(user, [])],
            "stops": [s.to_json() for s in self.enforcer.stops.get(user, [])],
        }

    async def overview(self, now: datetime | None = None) -> dict[str, Any]:
        """What the admin sees: every GPU and its holder, every server, totals, warnings."""
        now = now or _utcnow()
        usage = await self.ledger.period_usage(None, now)
        month = sorted(usage.items(), key=lambda kv: -kv[1]["month"]["usd"] - kv[1]["month"]["gpu_hours"])
        gpus = self._gpu_rows()
        return {
            "at": _stamp(now),
            "last_tick": _stamp(self.last_tick) if self.last_tick else None,
            "gpus": gpus,
            "servers": [{k: v for k, v in self._server_json(r).items() if k != "history"} for r in self.runs],
            "totals": {
                "servers": len(self.runs),
                "gpus": len(gpus),
                "gpus_held": sum(1 for g in gpus if g["holder"]),
                "usd_per_hour": sum(r.usd_per_hour for r in self.runs),
                **{
                    period: {m: sum(u[period][m] for u in usage.values()) for m in ("gpu_hours", "usd")}
                    for period in PERIODS
                },
            },
            "daily": await self.ledger.daily(None, 30, now),
            "top_users": [{"user": u, **v["month"]} for u, v in month[:20]],
            "warnings": [w.to_json() for ws in self.enforcer.warnings.values() for w in ws],
        }
