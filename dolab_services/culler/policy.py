"""What the culler decides for one server, as a pure function of facts, policy and time.

Running work is never idle: a busy kernel or a GPU above the threshold keeps a server alive with no browser open.
Idle servers stop after their profile's timeout, every server at its ``max_age``, and the user's ``stop_at`` is a
hard deadline that even exemptions do not lift (the user chose it). A warning comes ``warn_before_seconds``
before any stop the culler can foresee.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from dolab_core.plans import PlanTable

__all__ = ["DEFAULT_RULES", "CullPolicy", "Decision", "Rule", "ServerFacts", "decide", "needs_inspection"]

HOUR = 3600.0
#: The longest timeout config may set (ten years); longer ones would overflow date arithmetic. ``null`` is "never".
MAX_HOURS = 87600.0


@dataclass(frozen=True)
class Rule:
    """Timeouts for the servers it matches: by profile slug, backend and whether they hold GPUs.

    An empty match field matches everything; ``None`` for a timeout means "never".
    """

    idle_seconds: float | None
    max_age_seconds: float | None = None
    profile: str = ""
    backend: str = ""
    gpu: bool | None = None

    def matches(self, profile: str, backend: str, gpus: int) -> bool:
        """Whether this rule is about such a server."""
        return (
            (not self.profile or self.profile == profile)
            and (not self.backend or self.backend == backend)
            and (self.gpu is None or self.gpu == (gpus > 0))
        )


#: The defaults, most specific first: an expensive GPU should not sit idle for long, a CPU server may.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(idle_seconds=0.25 * HOUR, backend="runpod"),
    Rule(idle_seconds=1 * HOUR, gpu=True),
    Rule(idle_seconds=24 * HOUR),
)


@dataclass(frozen=True)
class CullPolicy:
    """The admin's policy: ordered rules (the first match wins), warnings, exemptions, the GPU threshold."""

    rules: Sequence[Rule] = DEFAULT_RULES
    warn_before_seconds: float = 600
    gpu_busy_percent: float = 10
    exempt_users: frozenset[str] = frozenset()
    exempt_groups: frozenset[str] = frozenset()
    #: The admins' plans (``dolab_core.plans``): a plan with ``cull_exempt`` exempts its members too.
    plans: PlanTable = field(default_factory=PlanTable)

    def rule_for(self, profile: str, backend: str, gpus: int) -> Rule:
        """The first rule that matches (a never-culling rule when none does)."""
        return next((r for r in self.rules if r.matches(profile, backend, gpus)), Rule(idle_seconds=None))

    def is_exempt(self, user: str, groups: Iterable[str]) -> bool:
        """Whether the admin exempted this user from idle and age stops (by name, group or plan)."""
        groups = tuple(groups)
        if user in self.exempt_users or self.exempt_groups.intersection(groups):
            return True
        return self.plans.configured and self.plans.plan_for(groups).cull_exempt

    def max_run_hours(self, groups: Iterable[str], hub_limit: float) -> float:
        """How far ahead a member of ``groups`` may set a stop time: the hub's limit (0: none), lowered by their
        plan's ``max_run_hours`` when it has one (the spawner applies the same rule at spawn)."""
        plan_limit = self.plans.plan_for(groups).max_run_hours if self.plans.configured else None
        if plan_limit is None:
            return hub_limit
        return plan_limit if hub_limit <= 0 else min(hub_limit, plan_limit)

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> CullPolicy:
        """Build from a JSON-like dict (``rules`` as dicts with hours), with a ValueError sentence on bad input."""
        known = {"rules", "warn_before_minutes", "gpu_busy_percent", "exempt_users", "exempt_groups"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"culler policy: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        raw_rules = data.get("rules", [])
        if isinstance(raw_rules, (str, bytes, Mapping)) or not isinstance(raw_rules, Sequence):
            raise ValueError(f"culler policy: rules must be a list of dicts, not {raw_rules!r}")
        rules = []
        for i, raw in enumerate(raw_rules):
            allowed = {"profile", "backend", "gpu", "idle_hours", "max_age_hours"}
            if not isinstance(raw, Mapping) or set(raw) - allowed:
                raise ValueError(
                    f"culler policy: rules[{i}] must be a dict with keys among {', '.join(sorted(allowed))}"
                )
            for key in ("profile", "backend"):
                if not isinstance(raw.get(key, ""), str):
                    raise ValueError(f"culler policy: rules[{i}].{key} must be a string, not {raw[key]!r}")
            gpu = raw.get("gpu")
            if gpu is not None and not isinstance(gpu, bool):
                raise ValueError(f"culler policy: rules[{i}].gpu must be true, false or null, not {gpu!r}")
            rules.append(
                Rule(
                    idle_seconds=_hours(raw.get("idle_hours"), f"rules[{i}].idle_hours"),
                    max_age_seconds=_hours(raw.get("max_age_hours"), f"rules[{i}].max_age_hours"),
                    profile=raw.get("profile", ""),
                    backend=raw.get("backend", ""),
                    gpu=gpu,
                )
            )
        warn = data.get("warn_before_minutes", 10)
        threshold = data.get("gpu_busy_percent", 10)
        for name, value, most in (
            ("warn_before_minutes", warn, MAX_HOURS * 60),
            ("gpu_busy_percent", threshold, 100.0),
        ):
            if not _is_number(value) or not 0 <= value <= most:
                raise ValueError(f"culler policy: {name} must be a number from 0 to {most:.0f}, not {value!r}")
        return cls(
            rules=tuple(rules) + DEFAULT_RULES if rules else DEFAULT_RULES,
            warn_before_seconds=float(warn) * 60,
            gpu_busy_percent=float(threshold),
            exempt_users=_names(data.get("exempt_users", ()), "exempt_users"),
            exempt_groups=_names(data.get("exempt_groups", ()), "exempt_groups"),
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _names(value: Any, where: str) -> frozenset[str]:
    # A bare string would otherwise become a set of its letters: "alice" would exempt "a", not alice.
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"culler policy: {where} must be a list of names, not {value!r}")
    names = list(value)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"culler policy: {where} must be a list of non-empty names, not {names!r}")
    return frozenset(names)


def _hours(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not 0 < value <= MAX_HOURS:
        raise ValueError(
            f"culler policy: {where} must be a positive number of hours up to {MAX_HOURS:g}, or null for never,"
            f" not {value!r}"
        )
    return float(value) * HOUR


@dataclass(frozen=True)
class ServerFacts:
    """What the culler knows about one running server."""

    user: str
    server: str
    started: datetime
    last_activity: datetime | None
    profile: str = ""
    backend: str = ""
    gpus: int = 0
    groups: tuple[str, ...] = ()
    stop_at: datetime | None = None
    #: None: not inspected (far from any timeout); else the number of kernels executing right now.
    busy_kernels: int | None = None
    #: The highest utilisation (percent) among the server's GPUs, None when unknown.
    gpu_percent: float | None = None


@dataclass(frozen=True)
class Decision:
    """``keep``, ``warn`` (a stop is coming at ``stop_at``) or ``stop``, with the reason."""

    action: Literal["keep", "warn", "stop"]
    reason: str
    stop_at: datetime | None = None
    #: Running work was seen: record it as activity so the hub and other tools agree.
    active: bool = False
    detail: str = field(default="", compare=False)


def _busy(facts: ServerFacts, policy: CullPolicy) -> str:
    if facts.busy_kernels is not None and facts.busy_kernels > 0:
        return f"{facts.busy_kernels} busy kernel(s)"
    if facts.gpu_percent is not None and facts.gpu_percent >= policy.gpu_busy_percent:
        return f"GPU at {facts.gpu_percent:.0f}%"
    return ""


def _upcoming(facts: ServerFacts, policy: CullPolicy, now: datetime, active: bool) -> list[tuple[datetime, str]]:
    """Every stop this server is heading for: (when, reason)."""
    stops = []
    if facts.stop_at is not None:
        stops.append((facts.stop_at, "deadline"))
    if policy.is_exempt(facts.user, facts.groups):
        return stops
    rule = policy.rule_for(facts.profile, facts.backend, facts.gpus)
    if rule.max_age_seconds is not None:
        stops.append((facts.started + timedelta(seconds=rule.max_age_seconds), "max_age"))
    if rule.idle_seconds is not None and not active:
        last = facts.last_activity or facts.started
        stops.append((last + timedelta(seconds=rule.idle_seconds), "idle"))
    return stops


def decide(facts: ServerFacts, policy: CullPolicy, now: datetime) -> Decision:
    """Keep, warn or stop one server. ``now`` is timezone-aware, like every time in ``facts``."""
    busy = _busy(facts, policy)
    stops = _upcoming(facts, policy, now, active=bool(busy))
    if stops:
        when, reason = min(stops)
        if when <= now:
            return Decision("stop", reason, when, active=bool(busy), detail=busy)
        if when - now <= timedelta(seconds=policy.warn_before_seconds):
            return Decision("warn", reason, when, active=bool(busy), detail=busy)
    if busy:
        return Decision("keep", "busy", active=True, detail=busy)
    if policy.is_exempt(facts.user, facts.groups):
        return Decision("keep", "exempt")
    return Decision("keep", "active")


def needs_inspection(facts: ServerFacts, policy: CullPolicy, now: datetime) -> bool:
    """Whether the server's kernels and GPU must be read: only when the hub's view says an idle stop is near.

    Far from its idle timeout a server is kept whatever its kernels do, so the sweep asks them nothing: that is
    what keeps a sweep over many servers cheap.
    """
    if policy.is_exempt(facts.user, facts.groups):
        return False
    rule = policy.rule_for(facts.profile, facts.backend, facts.gpus)
    if rule.idle_seconds is None:
        return False
    last = facts.last_activity or facts.started
    idle_stop = last + timedelta(seconds=rule.idle_seconds)
    return idle_stop - now <= timedelta(seconds=policy.warn_before_seconds)
