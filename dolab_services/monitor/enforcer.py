"""Quota enforcement at run time: a warning at the threshold, a stop through the shared stop path at 100%.

After each tick the monitor hands the enforcer every user's :class:`~.quotas.QuotaStatus` and running servers:

- a limit at or past ``warn_fraction`` (default 0.9) of its value becomes a :class:`QuotaWarning`, logged once
  when it appears and shown on the page and in the API until the period resets or the usage drops;
- a limit used up stops every *metered* server of the user (holding GPUs or costing money; CPU servers go on)
  through :class:`dolab_services.stop.StopPath` with reason ``quota``: the pre-stop hooks (workspace sync)
  run first, and a hook that refuses keeps the server until the next tick tries again. A stop in progress is not
  started twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..stop import StopPath, describe
from .quotas import LimitStatus, QuotaStatus, format_amount
from .runs import ServerRun

__all__ = ["QuotaEnforcer", "QuotaStop", "QuotaWarning"]


def _stamp(when: datetime) -> str:
    return when.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class QuotaWarning:
    """A user near a limit."""

    user: str
    limit: LimitStatus
    source: str
    since: datetime

    def message(self) -> str:
        """What the user reads."""
        s = self.limit
        return (
            f"You have used {100 * s.fraction:.0f}% of your quota ({format_amount(s.metric, s.used)} of "
            f"{format_amount(s.metric, s.limit)} {'today' if s.period == 'day' else 'this ' + s.period}). "
            f"At 100% your GPU servers are stopped (your workspace is saved first). {s.sentence()}"
        )

    def to_json(self) -> dict[str, Any]:
        """The API's form."""
        return {
            "user": self.user,
            "metric": self.limit.metric,
            "period": self.limit.period,
            "percent": round(100 * self.limit.fraction, 2),
            "since": _stamp(self.since),
            "quota": self.source,
            "message": self.message(),
        }


@dataclass(frozen=True)
class QuotaStop:
    """A stop the monitor asked for, and how it went (``stopped``, ``gone``, ``blocked``, ``failed``, ...)."""

    user: str
    server: str
    at: datetime
    detail: str
    outcome: str

    def to_json(self) -> dict[str, Any]:
        """The API's form."""
        return {"server": self.server, "at": _stamp(self.at), "detail": self.detail, "outcome": self.outcome}


class QuotaEnforcer:
    """Warnings and stops from quota statuses (see the module docstring). ``enforce=False``: warn only."""

    def __init__(
        self,
        stop_path: StopPath,
        *,
        warn_fraction: float = 0.9,
        enforce: bool = True,
        log: logging.Logger | None = None,
    ) -> None:
        self.stop_path = stop_path
        self.warn_fraction = warn_fraction
        self.enforce = enforce
        self.log = log or logging.getLogger("dolab.monitor")
        self.warnings: dict[str, list[QuotaWarning]] = {}
        self.stops: dict[str, list[QuotaStop]] = {}
        self._stopping: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def apply(self, statuses: Mapping[str, QuotaStatus], runs: Sequence[ServerRun], now: datetime) -> int:
        """Update warnings and start the stops the statuses call for; how many stops were started."""
        warnings: dict[str, list[QuotaWarning]] = {}
        for user, status in statuses.items():
            previous = {(w.limit.metric, w.limit.period): w for w in self.warnings.get(user, [])}
            for limit in status.near(self.warn_fraction):
                old = previous.get((limit.metric, limit.period))
                warning = QuotaWarning(user, limit, status.quota.source, old.since if old else now)
                if old is None:
                    self.log.warning(
                        "Quota warning: %s has used %.0f%% of %s per %s (%s of %s, %s)",
                        user,
                        100 * limit.fraction,
                        limit.metric,
                        limit.period,
                        format_amount(limit.metric, limit.used),
                        format_amount(limit.metric, limit.limit),
                        status.quota.source,
                    )
                warnings.setdefault(user, []).append(warning)
        self.warnings = warnings
        started = 0
        by_user: dict[str, list[ServerRun]] = {}
        for run in runs:
            by_user.setdefault(run.user, []).append(run)
        for user, status in statuses.items():
            exceeded = status.exceeded
            if not exceeded:
                continue
            first = exceeded[0]
            detail = (
                f"{first.metric} per {first.period}: {format_amount(first.metric, first.used)} of "
                f"{format_amount(first.metric, first.limit)}, {status.quota.source}"
            )
            for run in by_user.get(user, []):
                if not run.metered or run.key in self._stopping or run.pending == "stop":
                    continue  # nothing to stop, or a stop already on its way
                if not self.enforce:
                    self.log.info("Quota used up: would stop server %s (%s)", describe(*run.key), detail)
                    continue
                self._stopping.add(run.key)
                task = asyncio.create_task(self._stop(run, detail))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                started += 1
        return started

    async def _stop(self, run: ServerRun, detail: str) -> None:
        began = time.time()
        outcome = "failed"
        try:
            outcome = await self.stop_path.stop(run.user, run.server, "quota", detail)
        except Exception:
            self.log.exception("Stopping server %s for its quota failed", describe(*run.key))
        finally:
            self._stopping.discard(run.key)
            record = QuotaStop(run.user, run.server, datetime.fromtimestamp(began, timezone.utc), detail, outcome)
            self.stops[run.user] = [*self.stops.get(run.user, [])[-9:], record]

    async def drain(self) -> None:
        """Wait for the stops in progress (tests, shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
