"""Plans: what the members of a group may run and spend.

Admins map groups to plans; a user's plan combines the plans of all their groups. Everything here is pure
(config in, data out, errors as sentences), so the spawner, the culler and the monitor read plans the same way::

    {
      "plans": {
        "cpu": {"profiles": ["cpu"], "max_run_hours": 24},
        "gpu": {
          "profiles": ["cpu", "a100"],
          "quotas": {"gpu_hours": {"week": 40}, "usd": {"month": 200}},
          "max_run_hours": 72
        },
        "staff": {"profiles": "*", "quotas": {"usd": {"month": null}}, "cull_exempt": true}
      },
      "groups": {"students": "cpu", "researchers": "gpu", "lab-staff": ["gpu", "staff"]},
      "default_plan": "cpu"
    }

How plans combine (a user in several groups gets every plan of every group, then):

- ``profiles``: the union. ``"*"`` means every profile. A plan without ``profiles`` grants none.
- ``quotas``: ``{"gpu_hours": {"day"|"week"|"month": number}, "usd": {...}}``; for each metric and period the most
  generous wins: ``null`` (no limit) beats any number, else the largest number. A plan that does not name a
  metric/period has no say in it; when no plan names it, there is no limit.
- ``max_run_hours``: the largest; ``null`` means no limit of the plan (the spawner's ``max_run_hours`` still
  applies). Plans that do not name it have no say; when none does, only the spawner's limit applies.
- ``cull_exempt``: true when any plan says so (exempts from idle and age culling, never from the user's own stop
  time).

Users in no mapped group get ``default_plan`` (if set), else a plan that allows nothing. With no plans configured
at all, :data:`UNRESTRICTED` applies: every profile, no quota, no plan limit on run time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS",
    "PERIODS",
    "UNRESTRICTED",
    "Plan",
    "PlanConfigError",
    "PlanTable",
    "load_plans_file",
    "parse_plans",
    "plan_for",
    "plans_from_env",
    "service_environment",
]

#: How the shipped config hands the hub's plans to its services (JSON), beside ``DOLAB_PLANS_FILE``.
PLANS_ENV = "DOLAB_PLANS"

#: The quota metrics and periods the monitor understands.
METRICS = ("gpu_hours", "usd")
PERIODS = ("day", "week", "month")

_PLAN_KEYS = {"profiles", "quotas", "max_run_hours", "cull_exempt", "description"}
_TOP_KEYS = {"plans", "groups", "default_plan"}
_NO_LIMIT = None  # in quotas and max_run_hours: explicitly unlimited


class PlanConfigError(ValueError):
    """The admin's plans config is wrong; the message says where and how."""


@dataclass(frozen=True)
class Plan:
    """What one user may do: the combination of their groups' plans.

    ``profiles`` is None when every profile is allowed. ``quotas`` has exactly the monitor's shape
    (``{"gpu_hours": {"week": 40.0}, "usd": {"month": 200.0}}``); a missing metric or period has no limit.
    ``max_run_hours`` None: no limit of the plan.
    """

    names: tuple[str, ...] = ()
    profiles: frozenset[str] | None = frozenset()
    quotas: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    max_run_hours: float | None = None
    cull_exempt: bool = False

    def allows_profile(self, slug: str) -> bool:
        """Whether the plan lets the user start the profile ``slug``."""
        return self.profiles is None or slug in self.profiles

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (for services and logs)."""
        return {
            "names": list(self.names),
            "profiles": None if self.profiles is None else sorted(self.profiles),
            "quotas": {metric: dict(periods) for metric, periods in self.quotas.items()},
            "max_run_hours": self.max_run_hours,
            "cull_exempt": self.cull_exempt,
        }


#: No plans configured: nothing is restricted.
UNRESTRICTED = Plan(names=(), profiles=None)


@dataclass(frozen=True)
class _PlanSpec:
    """One plan as the admin wrote it (None: the plan has no say; _NO_LIMIT is stored as math.inf)."""

    name: str
    profiles: frozenset[str] | None  # None = "*"
    quotas: Mapping[str, Mapping[str, float]]  # inf = explicitly unlimited
    max_run_hours: float | None  # None = no say, inf = explicitly unlimited
    cull_exempt: bool


def _number(value: Any, where: str) -> float:
    if value is _NO_LIMIT:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PlanConfigError(f"{where} must be a number of 0 or more, or null for no limit; not {value!r}")
    return float(value)


def _parse_plan(name: str, raw: Any) -> _PlanSpec:
    where = f"plan {name!r}"
    if not isinstance(raw, Mapping):
        raise PlanConfigError(f"{where}: must be a dict with profiles, quotas, max_run_hours and cull_exempt")
    unknown = sorted(set(raw) - _PLAN_KEYS)
    if unknown:
        raise PlanConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_PLAN_KEYS))}")
    raw_profiles = raw.get("profiles", [])
    profiles: frozenset[str] | None
    if raw_profiles == "*":
        profiles = None
    elif isinstance(raw_profiles, (list, tuple)) and all(isinstance(p, str) and p for p in raw_profiles):
        profiles = frozenset(raw_profiles)
    else:
        raise PlanConfigError(f'{where}: profiles must be a list of profile slugs, or "*" for all of them')
    raw_quotas = raw.get("quotas", {})
    if not isinstance(raw_quotas, Mapping):
        raise PlanConfigError(f'{where}: quotas must be a dict such as {{"gpu_hours": {{"week": 40}}}}')
    quotas: dict[str, dict[str, float]] = {}
    for metric, periods in raw_quotas.items():
        if metric not in METRICS:
            raise PlanConfigError(f"{where}: unknown quota {metric!r}; quotas are {', '.join(METRICS)}")
        if not isinstance(periods, Mapping):
            raise PlanConfigError(f'{where}: quotas.{metric} must be a dict such as {{"week": 40}}')
        for period, value in periods.items():
            if period not in PERIODS:
                raise PlanConfigError(f"{where}: quotas.{metric}: unknown period {period!r}; use {', '.join(PERIODS)}")
            quotas.setdefault(metric, {})[period] = _number(value, f"{where}: quotas.{metric}.{period}")
    max_run_hours: float | None = None
    if "max_run_hours" in raw:
        max_run_hours = _number(raw["max_run_hours"], f"{where}: max_run_hours")
        if max_run_hours == 0:
            raise PlanConfigError(f"{where}: max_run_hours must be more than 0 (null: no limit)")
    exempt = raw.get("cull_exempt", False)
    if not isinstance(exempt, bool):
        raise PlanConfigError(f"{where}: cull_exempt must be true or false, not {exempt!r}")
    return _PlanSpec(name, profiles, quotas, max_run_hours, exempt)


def _combine(specs: list[_PlanSpec]) -> Plan:
    if not specs:
        return Plan()
    profiles: set[str] | None = set()
    quotas: dict[str, dict[str, float]] = {}
    max_run_hours: float | None = None
    for spec in specs:
        if spec.profiles is None or profiles is None:
            profiles = None
        else:
            profiles |= spec.profiles
        for metric, periods in spec.quotas.items():
            for period, value in periods.items():
                current = quotas.setdefault(metric, {}).get(period)
                quotas[metric][period] = value if current is None else max(current, value)
        if spec.max_run_hours is not None:
            max_run_hours = spec.max_run_hours if max_run_hours is None else max(max_run_hours, spec.max_run_hours)
    finite = {m: {p: v for p, v in ps.items() if v != math.inf} for m, ps in quotas.items()}
    return Plan(
        names=tuple(s.name for s in specs),
        profiles=None if profiles is None else frozenset(profiles),
        quotas={m: ps for m, ps in finite.items() if ps},
        max_run_hours=None if max_run_hours in (None, math.inf) else max_run_hours,
        cull_exempt=any(s.cull_exempt for s in specs),
    )


@dataclass(frozen=True)
class PlanTable:
    """The admin's plans and which groups get them. Empty (no plans): everyone is :data:`UNRESTRICTED`."""

    plans: Mapping[str, _PlanSpec] = field(default_factory=dict)
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_plan: str | None = None

    @property
    def configured(self) -> bool:
        """Whether any plan is configured (else nothing is restricted)."""
        return bool(self.plans)

    def plan_names_for(self, groups: Iterable[str]) -> list[str]:
        """The names of the plans a member of ``groups`` gets, in config order, without repeats."""
        names: list[str] = []
        for group in sorted(set(groups)):
            for name in self.groups.get(group, ()):
                if name not in names:
                    names.append(name)
        if not names and self.default_plan:
            names.append(self.default_plan)
        return [n for n in self.plans if n in names]

    def plan_for(self, groups: Iterable[str]) -> Plan:
        """The combined plan of a user in ``groups`` (group names)."""
        if not self.configured:
            return UNRESTRICTED
        return _combine([self.plans[n] for n in self.plan_names_for(groups)])

    def profile_slugs(self) -> set[str]:
        """Every profile slug a plan names (to check against ``profile_list``)."""
        return {slug for spec in self.plans.values() for slug in spec.profiles or ()}


def parse_plans(raw: Any) -> PlanTable:
    """Check an admin's plans config (see the module docstring) and build a :class:`PlanTable`.

    Raises :class:`PlanConfigError` with a sentence saying where the config is wrong. ``None`` or ``{}``: no plans.
    """
    if raw is None or raw == {}:
        return PlanTable()
    if not isinstance(raw, Mapping):
        raise PlanConfigError("plans must be a dict with plans, groups and default_plan")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise PlanConfigError(f"plans: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    raw_plans = raw.get("plans")
    if not isinstance(raw_plans, Mapping) or not raw_plans:
        raise PlanConfigError("plans: 'plans' must be a non-empty dict of plan name -> plan")
    plans = {}
    for name, spec in raw_plans.items():
        if not isinstance(name, str) or not name:
            raise PlanConfigError("plans: plan names must be non-empty strings")
        plans[name] = _parse_plan(name, spec)
    raw_groups = raw.get("groups", {})
    if not isinstance(raw_groups, Mapping):
        raise PlanConfigError('plans: groups must be a dict of group name -> plan name(s), e.g. {"students": "cpu"}')
    groups: dict[str, tuple[str, ...]] = {}
    for group, names in raw_groups.items():
        listed = [names] if isinstance(names, str) else names
        if not isinstance(listed, (list, tuple)) or not all(isinstance(n, str) for n in listed):
            raise PlanConfigError(f"plans: group {group!r} must map to a plan name or a list of plan names")
        missing = [n for n in listed if n not in plans]
        if missing:
            raise PlanConfigError(
                f"plans: group {group!r} names unknown plan(s) {', '.join(missing)}; plans are: {', '.join(plans)}"
            )
        groups[str(group)] = tuple(listed)
    default = raw.get("default_plan")
    if default is not None and default not in plans:
        raise PlanConfigError(f"plans: default_plan {default!r} is not a plan; plans are: {', '.join(plans)}")
    return PlanTable(plans=plans, groups=groups, default_plan=default)


def load_plans_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a plans JSON file; raises :class:`PlanConfigError` with a sentence when it is unreadable or invalid."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as e:
        raise PlanConfigError(f"the plans file {path} cannot be read: {e.strerror or e}") from None
    except ValueError as e:
        raise PlanConfigError(f"the plans file {path} is not valid JSON: {e}") from None
    parse_plans(raw)
    return raw


def service_environment(raw: Mapping[str, Any] | None) -> dict[str, str]:
    """The environment that gives a hub-managed service the hub's plans (``c.DoLabSpawner.plans``): services do not
    inherit the hub's config, and the culler's exemptions and the monitor's quotas must read the same plans."""
    return {PLANS_ENV: json.dumps(raw, sort_keys=True)} if raw else {}


def plans_from_env(environ: Mapping[str, str] | None = None) -> PlanTable:
    """The plans a service was given: ``$DOLAB_PLANS`` (JSON, see :func:`service_environment`), else the file named
    by ``$DOLAB_PLANS_FILE``, else none. Raises :class:`PlanConfigError` with a sentence when they are invalid."""
    environ = os.environ if environ is None else environ
    text = environ.get(PLANS_ENV, "")
    if text:
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise PlanConfigError(f"${PLANS_ENV} is not valid JSON: {e}") from None
        return parse_plans(raw)
    path = environ.get("DOLAB_PLANS_FILE", "")
    return parse_plans(load_plans_file(path)) if path else PlanTable()


_env_table: tuple[str, float, PlanTable] | None = None


def plan_for(groups: Iterable[str], table: PlanTable | Mapping[str, Any] | None = None) -> Plan:
    """The plan of a user in ``groups``.

    ``table`` is a :class:`PlanTable` or the raw config; None reads the file named by ``DOLAB_PLANS_FILE`` (re-read
    when it changes; no variable: :data:`UNRESTRICTED`). This is how services (culler, monitor) read plans.
    Raises :class:`PlanConfigError` when the file is missing or invalid.
    """
    global _env_table
    if isinstance(table, PlanTable):
        return table.plan_for(groups)
    if table is not None:
        return parse_plans(table).plan_for(groups)
    path = os.environ.get("DOLAB_PLANS_FILE", "")
    if not path:
        return UNRESTRICTED
    try:
        mtime = os.stat(path).st_mtime
    except OSError as e:
        raise PlanConfigError(f"the plans file {path} cannot be read: {e.strerror or e}") from None
    if _env_table is None or _env_table[:2] != (path, mtime):
        _env_table = (path, mtime, parse_plans(load_plans_file(path)))
    return _env_table[2].plan_for(groups)
