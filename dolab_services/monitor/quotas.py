"""Quotas: GPU-hours and US dollars per day, week or month, per user and per JupyterHub group.

The configuration (the same shape the plans of the authenticator produce)::

    {
      "users":   {"alice": Q, ...},
      "groups":  {"gpu-team": Q, ...},
      "default": Q
    }
    Q = {"gpu_hours": {"day": 8, "week": 30}, "usd": {"month": 200}}

A ``Q`` sets any of the metrics ``gpu_hours`` and ``usd``, each for any of the periods ``day``, ``week`` and
``month`` (UTC boundaries, weeks start on Monday: see :mod:`.periods`). A limit is a number >= 0; ``null`` (or
infinity) says "explicitly no limit"; a missing key says nothing. Every limit of the quota that applies holds at
once.

Which quota applies to a user (:meth:`QuotaConfig.for_user`):

1. the user's own entry under ``users``, whole, when there is one (an admin's exception wins over everything);
2. else, when some of the user's groups have an entry, the most generous combination of those, limit by limit (the
   rule of ``dolab_core.plans``): a group that does not name a metric and period has no say in it; ``null``
   from any group means no limit; else the largest number named. Example: ``gpu-team`` ``{"gpu_hours": {"week":
   30}, "usd": {"month": 100}}`` and ``students`` ``{"gpu_hours": {"week": 40}}`` give ``{"gpu_hours": {"week":
   40}, "usd": {"month": 100}}``; adding ``staff`` ``{"usd": {"month": null}}`` lifts the USD limit;
3. else ``default``; without one, the user has no quota.

The admins' plans (``dolab_core.plans``, handed to the service as ``$DOLAB_PLANS`` or ``$DOLAB_PLANS_FILE``)
carry quotas of the same shape: the user's plan quota counts as one more group entry in step 2 (so plans and this
file's groups combine by the same most-generous rule, and a user's own entry still wins).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, get_args

from dolab_core.plans import PlanTable

from .periods import PERIODS, Period, period_bounds

__all__ = [
    "METRICS",
    "LimitStatus",
    "Metric",
    "Quota",
    "QuotaConfig",
    "QuotaStatus",
    "evaluate",
    "format_amount",
    "format_reset",
]

Metric = Literal["gpu_hours", "usd"]
METRICS: tuple[Metric, ...] = get_args(Metric)
_UNITS = {"gpu_hours": "GPU-hours", "usd": "USD"}
_PERIOD_WORDS = {"day": "today", "week": "this week", "month": "this month"}


@dataclass(frozen=True)
class Quota:
    """Limits by ``(metric, period)``; an empty quota limits nothing. ``source`` says where it came from.

    ``unlimited`` holds the ``(metric, period)`` pairs the config explicitly left without a limit (``null``).
    """

    limits: Mapping[tuple[Metric, Period], float] = field(default_factory=dict)
    source: str = ""
    unlimited: frozenset[tuple[Metric, Period]] = frozenset()

    @classmethod
    def from_config(cls, data: Any, where: str) -> Quota:
        """A ``Q`` dict; ValueError with a sentence naming ``where`` for a bad one."""
        if data is None:
            return cls(source=where)
        if not isinstance(data, Mapping):
            raise ValueError(f'{where} must be an object like {{"gpu_hours": {{"day": 8}}}}, not {data!r}')
        limits: dict[tuple[Metric, Period], float] = {}
        unlimited: set[tuple[Metric, Period]] = set()
        for metric, periods in data.items():
            if metric not in METRICS:
                raise ValueError(f"{where}: unknown metric {metric!r}; use {' or '.join(METRICS)}")
            if periods is None:
                continue
            if not isinstance(periods, Mapping):
                raise ValueError(f"{where}.{metric} must be an object of period -> limit, not {periods!r}")
            for period, value in periods.items():
                if period not in PERIODS:
                    raise ValueError(f"{where}.{metric}: unknown period {period!r}; use {', '.join(PERIODS)}")
                if value is None or value == math.inf:
                    unlimited.add((metric, period))
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                    raise ValueError(f"{where}.{metric}.{period} must be a number, not {value!r}")
                if value < 0:
                    raise ValueError(f"{where}.{metric}.{period} must be 0 or more, not {value!r}")
                limits[(metric, period)] = float(value)
        return cls(limits, where, frozenset(unlimited))

    def __bool__(self) -> bool:
        return bool(self.limits)


@dataclass(frozen=True)
class QuotaConfig:
    """The admin's quotas (see the module docstring for the shape and the combination rule)."""

    users: Mapping[str, Quota] = field(default_factory=dict)
    groups: Mapping[str, Quota] = field(default_factory=dict)
    default: Quota = field(default_factory=Quota)
    plans: PlanTable = field(default_factory=PlanTable)

    @classmethod
    def from_config(cls, data: Any) -> QuotaConfig:
        """Parse and check the config dict; ValueError with a sentence saying what is wrong and where."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError("quotas must be an object with users, groups and default")
        unknown = sorted(set(data) - {"users", "groups", "default"})
        if unknown:
            raise ValueError(f"quotas: unknown key(s) {', '.join(map(repr, unknown))}; use users, groups, default")
        parsed: dict[str, dict[str, Quota]] = {}
        for kind in ("users", "groups"):
            entries = data.get(kind)
            entries = {} if entries is None else entries
            if not isinstance(entries, Mapping):
                raise ValueError(f"quotas.{kind} must be an object of name -> quota")
            parsed[kind] = {str(n): Quota.from_config(q, f"{kind[:-1]} {n}") for n, q in entries.items()}
        default = Quota.from_config(data.get("default"), "default")
        return cls(parsed["users"], parsed["groups"], default)

    @property
    def empty(self) -> bool:
        """Whether no quota is configured at all."""
        plan_quotas = any(spec.quotas for spec in self.plans.plans.values())
        return not (self.users or any(self.groups.values()) or self.default or plan_quotas)

    def for_user(self, user: str, groups: Iterable[str] = ()) -> Quota:
        """The quota that applies to ``user`` (member of ``groups``): own entry, else groups, else default."""
        if user in self.users:
            return self.users[user]
        groups = sorted(set(groups))
        entries = [(g, self.groups[g]) for g in groups if g in self.groups]
        sources = ["group " + ", ".join(g for g, _ in entries)] if entries else []
        if self.plans.configured:
            plan = self.plans.plan_for(groups)
            if plan.quotas:
                entries.append(("", Quota.from_config(plan.quotas, "plan")))
                sources.append("plan " + ", ".join(plan.names))
        if not entries:
            return self.default
        lifted = frozenset().union(*(q.unlimited for _, q in entries))
        limits: dict[tuple[Metric, Period], float] = {}
        for _, quota in entries:
            for key, value in quota.limits.items():
                if key not in lifted:
                    limits[key] = max(value, limits.get(key, value))
        return Quota(limits, "; ".join(sources), lifted)


def format_amount(metric: Metric, value: float) -> str:
    """``12.5 GPU-hours`` or ``3.20 USD``."""
    if metric == "usd":
        return f"{value:.2f} USD"
    return f"{value:.2f}".rstrip("0").rstrip(".") + " GPU-hours"


def format_reset(when: datetime) -> str:
    """A reset time as sentences show it: ``Monday 2026-11-30 00:00 UTC``."""
    return when.strftime("%A %Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class LimitStatus:
    """One limit of a user's quota against their usage in the current period."""

    metric: Metric
    period: Period
    limit: float
    used: float
    resets_at: datetime

    @property
    def remaining(self) -> float:
        """What is left (0 when used up)."""
        return max(0.0, self.limit - self.used)

    @property
    def fraction(self) -> float:
        """Used over limit (1.0 and more: used up; a 0 limit is used up from the start)."""
        if self.limit <= 0:
            return math.inf if self.used > 0 else 1.0
        return self.used / self.limit

    def sentence(self) -> str:
        """What remains and when it resets, as the user reads it."""
        when = _PERIOD_WORDS[self.period]
        unit = _UNITS[self.metric]
        if self.remaining <= 0:
            return (
                f"You have used {format_amount(self.metric, self.used)} of your "
                f"{format_amount(self.metric, self.limit)} {when}; it resets {format_reset(self.resets_at)}."
            )
        return (
            f"{format_amount(self.metric, self.remaining)} of your {self.limit:g} {unit} left {when}"
            f" (resets {format_reset(self.resets_at)})."
        )

    def to_json(self) -> dict[str, Any]:
        """The API's form."""
        return {
            "metric": self.metric,
            "period": self.period,
            "limit": self.limit,
            "used": round(self.used, 6),
            "remaining": round(self.remaining, 6),
            "percent": round(100 * self.fraction, 2) if math.isfinite(self.fraction) else None,
            "resets_at": self.resets_at.isoformat().replace("+00:00", "Z"),
            "message": self.sentence(),
        }


@dataclass(frozen=True)
class QuotaStatus:
    """A user's quota against their usage: every limit, and what that means."""

    user: str
    quota: Quota
    limits: tuple[LimitStatus, ...]

    @property
    def exceeded(self) -> tuple[LimitStatus, ...]:
        """The limits used up (nothing metered may run)."""
        return tuple(s for s in self.limits if s.fraction >= 1)

    def near(self, threshold: float) -> tuple[LimitStatus, ...]:
        """The limits at or past ``threshold`` (a fraction, e.g. 0.9) but not used up."""
        return tuple(s for s in self.limits if threshold <= s.fraction < 1)

    def refusal(self) -> str:
        """Why a GPU or paid server may not start now, with when it can ("" when it may)."""
        exceeded = self.exceeded
        if not exceeded:
            return ""
        # The user can start again once every used-up limit has reset: the latest reset.
        latest = max(exceeded, key=lambda s: s.resets_at)
        first = exceeded[0]
        unit = _UNITS[first.metric]
        text = (
            f"Your GPU quota is used up: {format_amount(first.metric, first.used)} of "
            f"{first.limit:g} {unit} {_PERIOD_WORDS[first.period]} ({self.quota.source}). "
        )
        if len(exceeded) > 1:
            text += f"{len(exceeded) - 1} other limit(s) are used up too. "
        return (
            text + f"You can start a GPU server again {format_reset(latest.resets_at)}; until then pick a CPU "
            "profile or ask an administrator for more."
        )

    def summary(self) -> str:
        """What remains of every limit, one sentence each ("No quota applies to you." without limits)."""
        if not self.limits:
            return "No quota applies to you."
        return " ".join(s.sentence() for s in self.limits)


def evaluate(user: str, quota: Quota, usage: Mapping[Period, Mapping[Metric, float]], now: datetime) -> QuotaStatus:
    """Each limit of ``quota`` against ``usage[period][metric]`` (GPU-hours, USD) of the periods containing now."""
    limits = []
    for (metric, period), limit in sorted(quota.limits.items(), key=lambda kv: (PERIODS.index(kv[0][1]), kv[0][0])):
        used = float((usage.get(period) or {}).get(metric, 0.0))
        limits.append(LimitStatus(metric, period, limit, used, period_bounds(period, now)[1]))
    return QuotaStatus(user, quota, tuple(limits))
