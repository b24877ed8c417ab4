"""Unit tests for dolab_services.culler.policy: what the culler decides for one server."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dolab_core.plans import parse_plans
from dolab_services.culler.policy import (
    DEFAULT_RULES,
    HOUR,
    CullPolicy,
    Decision,
    Rule,
    ServerFacts,
    decide,
    needs_inspection,
)

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=timezone.utc)
PARIS_SUMMER = timezone(timedelta(hours=2))
MINUTE = timedelta(minutes=1)
H = timedelta(hours=1)
DAY = timedelta(days=1)

DEFAULT = CullPolicy()
#: A profile that is never idle-culled but lives at most 8 hours.
BATCH = Rule(idle_seconds=None, max_age_seconds=8 * HOUR, profile="batch")
WITH_BATCH = CullPolicy(rules=(BATCH, *DEFAULT_RULES))
EXEMPT_ALICE = CullPolicy(rules=(BATCH, *DEFAULT_RULES), exempt_users=frozenset({"alice"}))
EXEMPT_STAFF = CullPolicy(exempt_groups=frozenset({"staff"}))


def facts(**overrides: Any) -> ServerFacts:
    """A CPU server of alice's, started two days ago, active a minute ago, not inspected."""
    values: dict[str, Any] = dict(user="alice", server="", started=NOW - 2 * DAY, last_activity=NOW - MINUTE)
    values.update(overrides)
    return ServerFacts(**values)


def gpu_facts(**overrides: Any) -> ServerFacts:
    """A local-backend server holding one GPU."""
    return facts(backend="local", gpus=1, **overrides)


# ----- decide -----------------------------------------------------------------------------------------------

DECISIONS = [
    pytest.param(facts(), DEFAULT, Decision("keep", "active"), id="recent activity -> keep"),
    pytest.param(
        facts(last_activity=NOW - 30 * H, busy_kernels=1),
        DEFAULT,
        Decision("keep", "busy", active=True),
        id="busy kernel past the idle timeout -> keep, active",
    ),
    pytest.param(
        gpu_facts(last_activity=NOW - 3 * H, busy_kernels=0, gpu_percent=80),
        DEFAULT,
        Decision("keep", "busy", active=True),
        id="GPU above the threshold, no busy kernel -> keep, active",
    ),
    pytest.param(
        gpu_facts(last_activity=NOW - 3 * H, busy_kernels=0, gpu_percent=10),
        DEFAULT,
        Decision("keep", "busy", active=True),
        id="GPU exactly at the threshold counts as busy",
    ),
    pytest.param(
        gpu_facts(last_activity=NOW - 3 * H, busy_kernels=0, gpu_percent=9.5),
        DEFAULT,
        Decision("stop", "idle", NOW - 2 * H),
        id="GPU below the threshold, idle past 1 h -> stop idle",
    ),
    pytest.param(
        gpu_facts(last_activity=NOW - 3 * H, busy_kernels=0, gpu_percent=None),
        DEFAULT,
        Decision("stop", "idle", NOW - 2 * H),
        id="GPU use unknown, no busy kernel, idle past 1 h -> stop idle",
    ),
    pytest.param(
        facts(last_activity=NOW - 25 * H, busy_kernels=-1),
        DEFAULT,
        Decision("stop", "idle", NOW - H),
        id="a negative kernel count is not running work",
    ),
    pytest.param(
        facts(last_activity=NOW - 24 * H + 5 * MINUTE, busy_kernels=0),
        DEFAULT,
        Decision("warn", "idle", NOW + 5 * MINUTE),
        id="idle within the warn window -> warn idle with the stop time",
    ),
    pytest.param(
        facts(last_activity=NOW - 24 * H + 10 * MINUTE, busy_kernels=0),
        DEFAULT,
        Decision("warn", "idle", NOW + 10 * MINUTE),
        id="warn window edge is inclusive",
    ),
    pytest.param(
        facts(last_activity=NOW - 24 * H + 11 * MINUTE),
        DEFAULT,
        Decision("keep", "active"),
        id="just before the warn window -> keep",
    ),
    pytest.param(
        facts(last_activity=NOW - 24 * H),
        DEFAULT,
        Decision("stop", "idle", NOW),
        id="idle timeout exactly now -> stop",
    ),
    pytest.param(
        facts(last_activity=NOW - 24 * H + 5 * MINUTE, busy_kernels=2),
        DEFAULT,
        Decision("keep", "busy", active=True),
        id="busy within the idle warn window -> no warning",
    ),
    pytest.param(
        facts(stop_at=NOW - MINUTE, busy_kernels=1),
        DEFAULT,
        Decision("stop", "deadline", NOW - MINUTE, active=True),
        id="deadline passed while busy -> stop deadline, active",
    ),
    pytest.param(
        gpu_facts(stop_at=NOW - MINUTE, gpu_percent=100),
        DEFAULT,
        Decision("stop", "deadline", NOW - MINUTE, active=True),
        id="deadline passed while the GPU is busy -> stop deadline",
    ),
    pytest.param(
        facts(stop_at=NOW + 5 * MINUTE),
        DEFAULT,
        Decision("warn", "deadline", NOW + 5 * MINUTE),
        id="deadline in the warn window -> warn deadline",
    ),
    pytest.param(
        facts(stop_at=NOW + 5 * MINUTE, busy_kernels=1),
        DEFAULT,
        Decision("warn", "deadline", NOW + 5 * MINUTE, active=True),
        id="deadline in the warn window while busy -> warn deadline, active",
    ),
    pytest.param(
        facts(stop_at=NOW + 2 * H),
        DEFAULT,
        Decision("keep", "active"),
        id="deadline far away -> keep",
    ),
    pytest.param(
        facts(last_activity=NOW - 24 * H + 5 * MINUTE, stop_at=NOW + 2 * MINUTE),
        DEFAULT,
        Decision("warn", "deadline", NOW + 2 * MINUTE),
        id="the nearer of deadline and idle stop is announced",
    ),
    pytest.param(
        facts(last_activity=NOW - 5 * DAY),
        EXEMPT_ALICE,
        Decision("keep", "exempt"),
        id="exempt user idle for days -> keep exempt",
    ),
    pytest.param(
        facts(user="bob", last_activity=NOW - 5 * DAY),
        EXEMPT_ALICE,
        Decision("stop", "idle", NOW - 4 * DAY),
        id="exemption is per user",
    ),
    pytest.param(
        facts(user="bob", groups=("students", "staff"), last_activity=NOW - 5 * DAY),
        EXEMPT_STAFF,
        Decision("keep", "exempt"),
        id="exempt group -> keep exempt",
    ),
    pytest.param(
        facts(last_activity=NOW - 5 * DAY, stop_at=NOW - MINUTE),
        EXEMPT_ALICE,
        Decision("stop", "deadline", NOW - MINUTE),
        id="exempt user past stop_at -> stop deadline",
    ),
    pytest.param(
        facts(stop_at=NOW + 5 * MINUTE),
        EXEMPT_ALICE,
        Decision("warn", "deadline", NOW + 5 * MINUTE),
        id="exempt user is warned of the deadline",
    ),
    pytest.param(
        facts(user="bob", profile="batch", started=NOW - 9 * H, busy_kernels=3),
        WITH_BATCH,
        Decision("stop", "max_age", NOW - H, active=True),
        id="max_age reached -> stop max_age, even while busy",
    ),
    pytest.param(
        facts(user="bob", profile="batch", started=NOW - 8 * H + 5 * MINUTE),
        WITH_BATCH,
        Decision("warn", "max_age", NOW + 5 * MINUTE),
        id="max_age in the warn window -> warn max_age",
    ),
    pytest.param(
        facts(profile="batch", started=NOW - 9 * H),
        EXEMPT_ALICE,
        Decision("keep", "exempt"),
        id="max_age does not apply to exempt users",
    ),
    pytest.param(
        facts(user="bob", profile="batch", started=NOW - 7 * H, last_activity=NOW - 7 * H),
        WITH_BATCH,
        Decision("keep", "active"),
        id="a never-idle rule keeps an idle server",
    ),
    pytest.param(
        facts(started=NOW - 25 * H, last_activity=None),
        DEFAULT,
        Decision("stop", "idle", NOW - H),
        id="no last_activity -> counts from started (stop)",
    ),
    pytest.param(
        facts(started=NOW - H, last_activity=None),
        DEFAULT,
        Decision("keep", "active"),
        id="no last_activity -> counts from started (keep)",
    ),
    pytest.param(
        facts(backend="runpod", gpus=1, last_activity=NOW - 16 * MINUTE, busy_kernels=0, gpu_percent=0),
        DEFAULT,
        Decision("stop", "idle", NOW - MINUTE),
        id="runpod idle 16 min -> stop after 15 min",
    ),
    pytest.param(
        facts(last_activity=(NOW - 25 * H).astimezone(PARIS_SUMMER)),
        DEFAULT,
        Decision("stop", "idle", NOW - H),
        id="times in another zone compare as instants",
    ),
    pytest.param(
        facts(stop_at=NOW.astimezone(PARIS_SUMMER)),
        DEFAULT,
        Decision("stop", "deadline", NOW),
        id="a deadline given in local time stops at that instant",
    ),
]


@pytest.mark.parametrize(("server", "policy", "expected"), DECISIONS)
def test_decide(server: ServerFacts, policy: CullPolicy, expected: Decision) -> None:
    decision = decide(server, policy, NOW)
    assert decision == expected
    if decision.stop_at is not None:
        assert decision.stop_at.tzinfo is not None
    assert bool(decision.detail) == decision.active


def test_decide_with_now_in_another_zone() -> None:
    server = facts(last_activity=NOW - 25 * H)
    assert decide(server, DEFAULT, NOW.astimezone(PARIS_SUMMER)) == decide(server, DEFAULT, NOW)


def test_detail_says_what_is_running() -> None:
    assert decide(facts(busy_kernels=2), DEFAULT, NOW).detail == "2 busy kernel(s)"
    assert decide(gpu_facts(gpu_percent=87.4), DEFAULT, NOW).detail == "GPU at 87%"


# ----- rule matching ----------------------------------------------------------------------------------------

CONFIGURED = CullPolicy.from_config(
    {
        "rules": [
            {"profile": "big-gpu", "idle_hours": 4},
            {"backend": "docker", "idle_hours": 2},
            {"gpu": True, "idle_hours": 0.5},
        ]
    }
)

RULE_MATCHES = [
    pytest.param(DEFAULT, "", "runpod", 1, 0.25 * HOUR, id="default: runpod GPU -> 15 min (backend before gpu)"),
    pytest.param(DEFAULT, "", "runpod", 0, 0.25 * HOUR, id="default: runpod without GPU -> 15 min"),
    pytest.param(DEFAULT, "", "local", 2, 1 * HOUR, id="default: local GPU -> 1 h"),
    pytest.param(DEFAULT, "", "docker", 1, 1 * HOUR, id="default: docker GPU -> 1 h"),
    pytest.param(DEFAULT, "", "local", 0, 24 * HOUR, id="default: CPU -> 24 h"),
    pytest.param(CONFIGURED, "big-gpu", "runpod", 1, 4 * HOUR, id="profile rule before backend defaults"),
    pytest.param(CONFIGURED, "big-gpu", "docker", 1, 4 * HOUR, id="profile rule before backend rule"),
    pytest.param(CONFIGURED, "small", "docker", 1, 2 * HOUR, id="backend rule before gpu rule"),
    pytest.param(CONFIGURED, "small", "local", 1, 0.5 * HOUR, id="gpu rule before defaults"),
    pytest.param(CONFIGURED, "small", "runpod", 0, 0.25 * HOUR, id="no configured match -> defaults"),
    pytest.param(CONFIGURED, "small", "local", 0, 24 * HOUR, id="CPU falls through to the 24 h default"),
    pytest.param(CullPolicy(rules=()), "", "local", 1, None, id="no rule at all -> never idle-culled"),
]


@pytest.mark.parametrize(("policy", "profile", "backend", "gpus", "idle_seconds"), RULE_MATCHES)
def test_rule_for(policy: CullPolicy, profile: str, backend: str, gpus: int, idle_seconds: float | None) -> None:
    assert policy.rule_for(profile, backend, gpus).idle_seconds == idle_seconds


def test_config_order_decides_between_configured_rules() -> None:
    policy = CullPolicy.from_config(
        {"rules": [{"backend": "docker", "idle_hours": 2}, {"profile": "big-gpu", "idle_hours": 4}]}
    )
    assert policy.rule_for("big-gpu", "docker", 1).idle_seconds == 2 * HOUR
    server = facts(profile="big-gpu", backend="docker", gpus=1, last_activity=NOW - 3 * H)
    assert decide(server, policy, NOW) == Decision("stop", "idle", NOW - H)


def test_rule_matching_in_decide() -> None:
    server = facts(profile="big-gpu", backend="runpod", gpus=1, last_activity=NOW - 3 * H)
    assert decide(server, DEFAULT, NOW).action == "stop"
    assert decide(server, CONFIGURED, NOW) == Decision("keep", "active")


# ----- needs_inspection -------------------------------------------------------------------------------------

INSPECTIONS = [
    pytest.param(facts(last_activity=NOW - H), DEFAULT, False, id="far from the timeout -> no"),
    pytest.param(facts(last_activity=NOW - 24 * H + 11 * MINUTE), DEFAULT, False, id="just outside the window"),
    pytest.param(facts(last_activity=NOW - 24 * H + 5 * MINUTE), DEFAULT, True, id="within the warn window -> yes"),
    pytest.param(facts(last_activity=NOW - 30 * H), DEFAULT, True, id="past the timeout -> yes"),
    pytest.param(gpu_facts(last_activity=NOW - 55 * MINUTE), DEFAULT, True, id="GPU rule: 5 min before 1 h"),
    pytest.param(facts(started=NOW - 24 * H, last_activity=None), DEFAULT, True, id="no activity: from started"),
    pytest.param(facts(last_activity=NOW - 30 * H), EXEMPT_ALICE, False, id="exempt user -> no"),
    pytest.param(facts(user="bob", groups=("staff",), last_activity=NOW - 30 * H), EXEMPT_STAFF, False, id="group"),
    pytest.param(
        facts(user="bob", profile="batch", last_activity=NOW - 30 * H), WITH_BATCH, False, id="never-idle rule -> no"
    ),
    pytest.param(facts(stop_at=NOW + MINUTE), DEFAULT, False, id="a near deadline needs no inspection"),
]


@pytest.mark.parametrize(("server", "policy", "expected"), INSPECTIONS)
def test_needs_inspection(server: ServerFacts, policy: CullPolicy, expected: bool) -> None:
    assert needs_inspection(server, policy, NOW) is expected


# ----- CullPolicy.from_config -------------------------------------------------------------------------------

GOOD_CONFIGS = [
    pytest.param({}, CullPolicy(), id="empty -> defaults"),
    pytest.param(
        {
            "rules": [{"profile": "big-gpu", "backend": "docker", "gpu": True, "idle_hours": 2, "max_age_hours": 48}],
            "warn_before_minutes": 5,
            "gpu_busy_percent": 25,
            "exempt_users": ["alice", "bob"],
            "exempt_groups": ["staff"],
        },
        CullPolicy(
            rules=(
                Rule(2 * HOUR, 48 * HOUR, profile="big-gpu", backend="docker", gpu=True),
                *DEFAULT_RULES,
            ),
            warn_before_seconds=300,
            gpu_busy_percent=25,
            exempt_users=frozenset({"alice", "bob"}),
            exempt_groups=frozenset({"staff"}),
        ),
        id="every key",
    ),
    pytest.param(
        {"rules": [{"profile": "batch", "idle_hours": None, "max_age_hours": 8}]},
        CullPolicy(rules=(BATCH, *DEFAULT_RULES)),
        id="null idle_hours means never",
    ),
    pytest.param(
        {"rules": [{"gpu": False, "idle_hours": 0.5}]},
        CullPolicy(rules=(Rule(0.5 * HOUR, gpu=False), *DEFAULT_RULES)),
        id="gpu false, fractional hours",
    ),
    pytest.param(
        {"warn_before_minutes": 0, "gpu_busy_percent": 0, "exempt_users": ()},
        CullPolicy(warn_before_seconds=0, gpu_busy_percent=0),
        id="zero warning and threshold",
    ),
]


@pytest.mark.parametrize(("data", "expected"), GOOD_CONFIGS)
def test_from_config_good(data: dict[str, Any], expected: CullPolicy) -> None:
    assert CullPolicy.from_config(data) == expected


BAD_CONFIGS = [
    pytest.param({"idle_hours": 1}, "unknown key(s) idle_hours; allowed:", id="unknown top-level key"),
    pytest.param({"rules": {"idle_hours": 1}}, "rules must be a list of dicts", id="rules not a list"),
    pytest.param({"rules": "idle"}, "rules must be a list of dicts", id="rules a string"),
    pytest.param({"rules": ["idle"]}, "rules[0] must be a dict with keys among", id="rule not a dict"),
    pytest.param(
        {"rules": [{"idle_hours": 1}, {"idle": 1}]}, "rules[1] must be a dict with keys among", id="unknown rule key"
    ),
    pytest.param({"rules": [{"idle_hours": 0}]}, "rules[0].idle_hours must be a positive number", id="zero hours"),
    pytest.param({"rules": [{"idle_hours": -1}]}, "rules[0].idle_hours must be a positive number", id="negative"),
    pytest.param({"rules": [{"idle_hours": "2"}]}, "rules[0].idle_hours must be a positive number", id="text hours"),
    pytest.param({"rules": [{"idle_hours": True}]}, "rules[0].idle_hours must be a positive number", id="bool hours"),
    pytest.param(
        {"rules": [{"idle_hours": float("inf")}]}, "rules[0].idle_hours must be a positive number", id="infinite"
    ),
    pytest.param({"rules": [{"idle_hours": float("nan")}]}, "or null for never", id="NaN hours"),
    pytest.param({"rules": [{"idle_hours": 1e9}]}, "up to 87600", id="hours past date arithmetic"),
    pytest.param(
        {"rules": [{"idle_hours": 1, "max_age_hours": "a day"}]},
        "rules[0].max_age_hours must be a positive number",
        id="bad max_age_hours",
    ),
    pytest.param({"rules": [{"gpu": "yes"}]}, "rules[0].gpu must be true, false or null", id="gpu not a bool"),
    pytest.param({"rules": [{"profile": 3}]}, "rules[0].profile must be a string", id="profile not a string"),
    pytest.param({"rules": [{"backend": None}]}, "rules[0].backend must be a string", id="backend null"),
    pytest.param({"warn_before_minutes": -1}, "warn_before_minutes must be a number from 0", id="negative warn"),
    pytest.param({"warn_before_minutes": "10"}, "warn_before_minutes must be a number from 0", id="text warn"),
    pytest.param({"warn_before_minutes": float("nan")}, "warn_before_minutes must be a number", id="NaN warn"),
    pytest.param({"gpu_busy_percent": 150}, "gpu_busy_percent must be a number from 0 to 100", id="threshold > 100"),
    pytest.param({"gpu_busy_percent": False}, "gpu_busy_percent must be a number", id="bool threshold"),
    pytest.param({"exempt_users": "alice"}, "exempt_users must be a list of names", id="exempt_users a string"),
    pytest.param({"exempt_groups": [1]}, "exempt_groups must be a list of non-empty names", id="group not a name"),
    pytest.param({"exempt_users": [""]}, "exempt_users must be a list of non-empty names", id="empty user name"),
]


@pytest.mark.parametrize(("data", "phrase"), BAD_CONFIGS)
def test_from_config_bad(data: dict[str, Any], phrase: str) -> None:
    with pytest.raises(ValueError) as info:
        CullPolicy.from_config(data)
    assert str(info.value).startswith("culler policy: ")
    assert phrase in str(info.value)


# ----- properties -------------------------------------------------------------------------------------------

ZONES = st.sampled_from([timezone.utc, PARIS_SUMMER, timezone(timedelta(hours=-7)), timezone(timedelta(hours=5.5))])
MAX_OFFSET_SECONDS = 40 * 24 * 3600.0


def _moment(offset_seconds: float, zone: timezone) -> datetime:
    return (NOW + timedelta(seconds=offset_seconds)).astimezone(zone)


@st.composite
def server_facts(draw: st.DrawFn) -> ServerFacts:
    started = _moment(-draw(st.floats(0, MAX_OFFSET_SECONDS)), draw(ZONES))
    last_activity = draw(
        st.none() | st.floats(0, 1).map(lambda f: (started + (NOW - started) * f).astimezone(timezone.utc))
    )
    stop_at = draw(st.none() | st.builds(_moment, st.floats(-MAX_OFFSET_SECONDS, MAX_OFFSET_SECONDS), ZONES))
    return ServerFacts(
        user=draw(st.sampled_from(["alice", "bob", "carol"])),
        server=draw(st.sampled_from(["", "gpu"])),
        started=started,
        last_activity=last_activity,
        profile=draw(st.sampled_from(["", "cpu", "big-gpu", "batch"])),
        backend=draw(st.sampled_from(["", "local", "docker", "runpod"])),
        gpus=draw(st.integers(0, 4)),
        groups=tuple(draw(st.lists(st.sampled_from(["staff", "students"]), unique=True))),
        stop_at=stop_at,
        busy_kernels=draw(st.none() | st.integers(-2, 5)),
        gpu_percent=draw(st.none() | st.floats(0, 100)),
    )


HOURS_OR_NEVER = st.none() | st.floats(60, 48 * HOUR)

RULES = st.builds(
    Rule,
    idle_seconds=HOURS_OR_NEVER,
    max_age_seconds=HOURS_OR_NEVER,
    profile=st.sampled_from(["", "cpu", "big-gpu", "batch"]),
    backend=st.sampled_from(["", "local", "docker", "runpod"]),
    gpu=st.sampled_from([None, True, False]),
)

POLICIES = st.builds(
    CullPolicy,
    rules=st.lists(RULES, max_size=4).map(lambda rules: (*rules, *DEFAULT_RULES)),
    warn_before_seconds=st.floats(0, 2 * HOUR),
    gpu_busy_percent=st.floats(0, 100),
    exempt_users=st.frozensets(st.sampled_from(["alice", "bob"])),
    exempt_groups=st.frozensets(st.sampled_from(["staff"])),
)


@settings(max_examples=500, deadline=None)
@given(server=server_facts(), policy=POLICIES, now_zone=ZONES)
def test_running_work_is_never_idle_culled(server: ServerFacts, policy: CullPolicy, now_zone: timezone) -> None:
    now = NOW.astimezone(now_zone)
    decision = decide(server, policy, now)
    running = (server.busy_kernels or 0) > 0 or (
        server.gpu_percent is not None and server.gpu_percent >= policy.gpu_busy_percent
    )
    if decision.action == "stop" and decision.reason == "idle":
        assert not (server.busy_kernels is not None and server.busy_kernels > 0)
        assert server.gpu_percent is None or server.gpu_percent < policy.gpu_busy_percent
    if decision.reason == "idle":
        assert not running, "not even a warning of an idle stop for a server doing work"
    assert decision.active == running
    if decision.action == "stop":
        assert decision.stop_at is not None and decision.stop_at <= now
    if decision.action == "warn":
        assert decision.stop_at is not None
        assert now < decision.stop_at <= now + timedelta(seconds=policy.warn_before_seconds)


@settings(max_examples=500, deadline=None)
@given(server=server_facts(), policy=POLICIES)
def test_skipping_inspection_never_hides_an_idle_stop(server: ServerFacts, policy: CullPolicy) -> None:
    """What the sweep relies on: a server it does not inspect cannot be heading for an idle warning or stop."""
    uninspected = replace(server, busy_kernels=None, gpu_percent=None)
    if not needs_inspection(uninspected, policy, NOW):
        assert decide(uninspected, policy, NOW).reason != "idle"


# ----- plans (dolab_core.plans): the same exemptions and run-time limits the spawner applies -------------------

PLANS = parse_plans(
    {
        "plans": {
            "short": {"profiles": "*", "max_run_hours": 4},
            "long": {"profiles": "*", "max_run_hours": None},
            "staff": {"profiles": "*", "cull_exempt": True},
        },
        "groups": {"students": "short", "research": "long", "lab-staff": "staff"},
    }
)
WITH_PLANS = CullPolicy(plans=PLANS)


@pytest.mark.parametrize(
    ("groups", "exempt"),
    [
        pytest.param((), False, id="no group"),
        pytest.param(("students",), False, id="plan without exemption"),
        pytest.param(("lab-staff",), True, id="exempt plan"),
        pytest.param(("students", "lab-staff"), True, id="any exempt plan exempts"),
    ],
)
def test_plan_exemption(groups: tuple[str, ...], exempt: bool) -> None:
    assert WITH_PLANS.is_exempt("alice", groups) is exempt
    server = facts(last_activity=NOW - 30 * H, groups=groups)
    assert (decide(server, WITH_PLANS, NOW).action == "stop") is not exempt


def test_plan_exemption_never_lifts_the_users_stop_time() -> None:
    server = facts(groups=("lab-staff",), stop_at=NOW - MINUTE)
    assert decide(server, WITH_PLANS, NOW) == Decision("stop", "deadline", NOW - MINUTE)


@pytest.mark.parametrize(
    ("groups", "hub_limit", "expected"),
    [
        pytest.param((), 168, 168, id="no plan limit -> hub's"),
        pytest.param(("students",), 168, 4, id="plan lowers the hub's"),
        pytest.param(("students",), 2, 2, id="hub's lower wins"),
        pytest.param(("students",), 0, 4, id="no hub limit -> plan's"),
        pytest.param(("research",), 168, 168, id="plan without limit -> hub's"),
        pytest.param(("students", "research"), 168, 168, id="most generous plan"),
    ],
)
def test_plan_max_run_hours(groups: tuple[str, ...], hub_limit: float, expected: float) -> None:
    assert WITH_PLANS.max_run_hours(groups, hub_limit) == expected


def test_no_plans_change_nothing() -> None:
    assert not DEFAULT.is_exempt("alice", ("lab-staff",))
    assert DEFAULT.max_run_hours(("students",), 168) == 168
