"""Plans (dolab_core.plans): the combination rule as tables, config errors as sentences, and the env-file path services
use."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dolab_core.plans import (
    UNRESTRICTED,
    Plan,
    PlanConfigError,
    load_plans_file,
    parse_plans,
    plan_for,
    plans_from_env,
    service_environment,
)

CONFIG = {
    "plans": {
        "cpu": {"profiles": ["cpu"], "max_run_hours": 24, "quotas": {"gpu_hours": {"week": 0}}},
        "gpu": {
            "profiles": ["cpu", "a100"],
            "quotas": {"gpu_hours": {"week": 40, "day": 8}, "usd": {"month": 200}},
            "max_run_hours": 72,
        },
        "big": {"profiles": ["h100"], "quotas": {"gpu_hours": {"week": 100}, "usd": {"month": 150}}},
        "staff": {"profiles": "*", "quotas": {"usd": {"month": None}}, "max_run_hours": None, "cull_exempt": True},
        "night": {"profiles": [], "cull_exempt": False, "max_run_hours": 12},
    },
    "groups": {
        "students": "cpu",
        "researchers": "gpu",
        "hpc": ["big"],
        "lab-staff": ["gpu", "staff"],
        "night-owls": "night",
    },
    "default_plan": "cpu",
}
TABLE = parse_plans(CONFIG)


@pytest.mark.parametrize(
    ("groups", "profiles", "quotas", "max_run_hours", "exempt"),
    [
        pytest.param([], {"cpu"}, {"gpu_hours": {"week": 0.0}}, 24.0, False, id="no-group-gets-default"),
        pytest.param(["unmapped"], {"cpu"}, {"gpu_hours": {"week": 0.0}}, 24.0, False, id="unmapped-gets-default"),
        pytest.param(["students"], {"cpu"}, {"gpu_hours": {"week": 0.0}}, 24.0, False, id="one-plan"),
        pytest.param(
            ["students", "researchers"],
            {"cpu", "a100"},
            {"gpu_hours": {"week": 40.0, "day": 8.0}, "usd": {"month": 200.0}},
            72.0,
            False,
            id="largest-numbers-win",
        ),
        pytest.param(
            ["researchers", "hpc"],
            {"cpu", "a100", "h100"},
            {"gpu_hours": {"week": 100.0, "day": 8.0}, "usd": {"month": 200.0}},
            72.0,
            False,
            id="union-of-profiles-max-per-period",
        ),
        pytest.param(
            ["hpc"], {"h100"}, {"gpu_hours": {"week": 100.0}, "usd": {"month": 150.0}}, None, False, id="no-run-limit"
        ),
        pytest.param(
            ["lab-staff"], None, {"gpu_hours": {"week": 40.0, "day": 8.0}}, None, True, id="star-null-and-exempt"
        ),
        pytest.param(
            ["night-owls", "students"], {"cpu"}, {"gpu_hours": {"week": 0.0}}, 24.0, False, id="run-hours-max"
        ),
        pytest.param(["night-owls"], set(), {}, 12.0, False, id="plan-granting-no-profile"),
    ],
)
def test_combination(groups, profiles, quotas, max_run_hours, exempt) -> None:
    plan = TABLE.plan_for(groups)
    assert plan.profiles == (None if profiles is None else frozenset(profiles))
    assert plan.quotas == quotas
    assert plan.max_run_hours == max_run_hours
    assert plan.cull_exempt is exempt


def test_quotas_have_the_monitors_shape() -> None:
    plan = TABLE.plan_for(["researchers", "hpc"])
    assert set(plan.quotas) <= {"gpu_hours", "usd"}
    for periods in plan.quotas.values():
        assert set(periods) <= {"day", "week", "month"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in periods.values())
    assert json.loads(json.dumps(plan.to_dict()))["quotas"] == plan.quotas


def test_null_beats_numbers_in_either_order() -> None:
    assert "usd" not in TABLE.plan_for(["lab-staff"]).quotas
    table = parse_plans({"plans": {"a": {"quotas": {"usd": {"day": None}}}, "b": {"quotas": {"usd": {"day": 5}}}},
                         "groups": {"x": ["b", "a"]}})  # fmt: skip
    assert table.plan_for(["x"]).quotas == {}


def test_no_default_plan_allows_nothing() -> None:
    table = parse_plans({"plans": {"cpu": {"profiles": ["cpu"]}}, "groups": {"students": "cpu"}})
    plan = table.plan_for(["visitors"])
    assert plan == Plan()
    assert not plan.allows_profile("cpu")
    assert table.plan_for(["students"]).allows_profile("cpu")


@pytest.mark.parametrize("raw", [None, {}])
def test_no_plans_is_unrestricted(raw) -> None:
    table = parse_plans(raw)
    assert table.plan_for(["anyone"]) is UNRESTRICTED
    assert UNRESTRICTED.allows_profile("a100")
    assert UNRESTRICTED.quotas == {} and UNRESTRICTED.max_run_hours is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param([], "must be a dict", id="not-a-dict"),
        pytest.param({"plans": {}}, "non-empty dict", id="no-plans"),
        pytest.param({"plans": {"a": {}}, "extra": 1}, "unknown key(s) extra", id="top-key"),
        pytest.param({"plans": {"a": {"gpus": 1}}}, "plan 'a': unknown key(s) gpus", id="plan-key"),
        pytest.param({"plans": {"a": {"profiles": "cpu"}}}, "list of profile slugs", id="profiles-string"),
        pytest.param({"plans": {"a": {"quotas": {"tokens": {}}}}}, "unknown quota 'tokens'", id="metric"),
        pytest.param({"plans": {"a": {"quotas": {"usd": {"year": 1}}}}}, "unknown period 'year'", id="period"),
        pytest.param({"plans": {"a": {"quotas": {"usd": {"day": -1}}}}}, "quotas.usd.day must be", id="negative"),
        pytest.param({"plans": {"a": {"quotas": {"usd": {"day": True}}}}}, "quotas.usd.day must be", id="bool"),
        pytest.param({"plans": {"a": {"max_run_hours": 0}}}, "more than 0", id="zero-hours"),
        pytest.param({"plans": {"a": {"cull_exempt": "yes"}}}, "true or false", id="exempt"),
        pytest.param({"plans": {"a": {}}, "groups": {"g": "b"}}, "unknown plan(s) b", id="group-plan"),
        pytest.param({"plans": {"a": {}}, "groups": {"g": 3}}, "plan name or a list", id="group-type"),
        pytest.param({"plans": {"a": {}}, "default_plan": "b"}, "default_plan 'b' is not a plan", id="default"),
    ],
)
def test_config_errors_are_sentences(raw, message: str) -> None:
    with pytest.raises(PlanConfigError) as e:
        parse_plans(raw)
    assert message in str(e.value)


def test_plan_for_reads_the_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(CONFIG))
    monkeypatch.setenv("DOLAB_PLANS_FILE", str(path))
    assert plan_for(["researchers"]).allows_profile("a100")
    assert not plan_for(["students"]).allows_profile("a100")
    assert plan_for(["researchers"], CONFIG) == plan_for(["researchers"])
    assert plan_for(["researchers"], TABLE) == plan_for(["researchers"])
    monkeypatch.setenv("DOLAB_PLANS_FILE", str(tmp_path / "gone.json"))
    with pytest.raises(PlanConfigError, match="cannot be read"):
        plan_for(["students"])
    monkeypatch.delenv("DOLAB_PLANS_FILE")
    assert plan_for(["students"]) is UNRESTRICTED


def test_load_plans_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PlanConfigError, match="cannot be read"):
        load_plans_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{plans:")
    with pytest.raises(PlanConfigError, match="not valid JSON"):
        load_plans_file(bad)


def test_plans_reach_services_through_their_environment(tmp_path: Path) -> None:
    raw = {"plans": {"gpu": {"profiles": ["a100"], "quotas": {"usd": {"month": 50}}}}, "groups": {"lab": "gpu"}}
    env = service_environment(raw)
    assert plans_from_env(env).plan_for(["lab"]).quotas == {"usd": {"month": 50.0}}
    assert service_environment({}) == {} and not plans_from_env({}).configured
    plans_file = tmp_path / "plans.json"
    plans_file.write_text(json.dumps(raw))
    assert plans_from_env({"DOLAB_PLANS_FILE": str(plans_file)}).plan_for(["lab"]).profiles == {"a100"}
    with pytest.raises(PlanConfigError, match="DOLAB_PLANS is not valid JSON"):
        plans_from_env({"DOLAB_PLANS": "{nope"})
