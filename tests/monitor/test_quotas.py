"""Unit tests for dolab_services.monitor.quotas: the config shape, the combination rule, limits and sentences."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import pytest

from dolab_core.plans import parse_plans
from dolab_services.monitor.quotas import Quota, QuotaConfig, evaluate

NOW = datetime(2026, 11, 26, 8, 30, tzinfo=timezone.utc)  # a Thursday

CONFIG = QuotaConfig.from_config(
    {
        "users": {"alice": {"gpu_hours": {"day": 2}}, "vip": {}},
        "groups": {
            "gpu-team": {"gpu_hours": {"day": 8, "week": 30}, "usd": {"month": 100}},
            "students": {"gpu_hours": {"day": 4, "week": 40}},
            "paid": {"usd": {"month": 500}, "gpu_hours": {"day": 1}},
            "staff": {"usd": {"month": None}},
        },
        "default": {"gpu_hours": {"day": 1}, "usd": {"month": 0}},
    }
)


@pytest.mark.parametrize(
    ("user", "groups", "limits", "source"),
    [
        ("alice", ["gpu-team"], {("gpu_hours", "day"): 2}, "user alice"),  # own entry wins over groups
        ("vip", ["gpu-team"], {}, "user vip"),  # an empty own entry: no limits at all
        (
            "bob",
            ["gpu-team"],
            {("gpu_hours", "day"): 8, ("gpu_hours", "week"): 30, ("usd", "month"): 100},
            "group gpu-team",
        ),
        # two groups: the largest of each limit; students name no USD limit, so they have no say in it
        (
            "carol",
            ["students", "gpu-team"],
            {("gpu_hours", "day"): 8, ("gpu_hours", "week"): 40, ("usd", "month"): 100},
            "group gpu-team, students",
        ),
        # an explicit null lifts that limit (and only that one)
        (
            "sam",
            ["staff", "gpu-team"],
            {("gpu_hours", "day"): 8, ("gpu_hours", "week"): 30},
            "group gpu-team, staff",
        ),
        (
            "dave",
            ["gpu-team", "paid"],
            {("gpu_hours", "day"): 8, ("gpu_hours", "week"): 30, ("usd", "month"): 500},
            "group gpu-team, paid",
        ),
        ("erin", ["other"], {("gpu_hours", "day"): 1, ("usd", "month"): 0}, "default"),  # no group with a quota
        ("erin", [], {("gpu_hours", "day"): 1, ("usd", "month"): 0}, "default"),
    ],
    ids=["own-entry", "own-empty", "one-group", "two-groups", "null-lifts", "paid-group", "other-group", "no-group"],
)
def test_which_quota_applies(user: str, groups: list[str], limits: dict[Any, float], source: str) -> None:
    quota = CONFIG.for_user(user, groups)
    assert dict(quota.limits) == limits
    assert quota.source == source


WITH_PLANS = replace(
    CONFIG,
    plans=parse_plans(
        {
            "plans": {
                "research": {"profiles": "*", "quotas": {"gpu_hours": {"week": 50}, "usd": {"month": 20}}},
                "free": {"profiles": ["cpu"]},
            },
            "groups": {"lab": "research", "gpu-team": "research", "guests": "free"},
        }
    ),
)


@pytest.mark.parametrize(
    ("user", "groups", "limits", "source"),
    [
        ("alice", ["lab"], {("gpu_hours", "day"): 2}, "user alice"),  # own entry still wins
        ("bob", ["lab"], {("gpu_hours", "week"): 50, ("usd", "month"): 20}, "plan research"),
        (
            "carol",
            ["gpu-team"],  # the file's group and the plan combine, the most generous limit by limit
            {("gpu_hours", "day"): 8, ("gpu_hours", "week"): 50, ("usd", "month"): 100},
            "group gpu-team; plan research",
        ),
        ("dave", ["guests"], {("gpu_hours", "day"): 1, ("usd", "month"): 0}, "default"),  # a plan without quotas
    ],
    ids=["own-entry", "plan-only", "group-and-plan", "plan-without-quotas"],
)
def test_plans_quotas_count_as_a_group_entry(
    user: str, groups: list[str], limits: dict[Any, float], source: str
) -> None:
    quota = WITH_PLANS.for_user(user, groups)
    assert dict(quota.limits) == limits
    assert quota.source == source


def test_plan_quotas_alone_make_the_config_non_empty() -> None:
    plans = parse_plans({"plans": {"p": {"profiles": "*", "quotas": {"usd": {"day": 1}}}}, "groups": {"g": "p"}})
    assert QuotaConfig().empty and not QuotaConfig(plans=plans).empty


def test_without_default_a_user_without_entry_has_no_quota() -> None:
    config = QuotaConfig.from_config({"groups": {"g": {"usd": {"day": 5}}}})
    assert not config.for_user("x", [])
    assert not QuotaConfig.from_config(None).for_user("x")
    assert QuotaConfig.from_config({}).empty and not config.empty


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([], "quotas must be an object"),
        ({"user": {}}, "unknown key(s) 'user'"),
        ({"users": []}, "quotas.users must be an object"),
        ({"users": {"a": {"gpu_hour": {"day": 1}}}}, "user a: unknown metric 'gpu_hour'"),
        ({"groups": {"g": {"usd": {"year": 1}}}}, "group g.usd: unknown period 'year'"),
        ({"default": {"usd": {"day": -1}}}, "default.usd.day must be 0 or more"),
        ({"default": {"usd": {"day": "5"}}}, "default.usd.day must be a number"),
        ({"default": {"usd": {"day": True}}}, "default.usd.day must be a number"),
        ({"default": {"usd": 5}}, "default.usd must be an object"),
        ({"default": {"usd": {"day": math.nan}}}, "default.usd.day must be a number"),
    ],
    ids=["list", "typo-key", "users-list", "typo-metric", "bad-period", "negative", "string", "bool", "flat", "nan"],
)
def test_bad_config_is_refused_with_a_sentence(config: Any, message: str) -> None:
    with pytest.raises(ValueError) as e:
        QuotaConfig.from_config(config)
    assert message in str(e.value)


def test_null_limits_mean_no_limit() -> None:
    quota = Quota.from_config({"usd": {"day": None, "week": 3, "month": math.inf}, "gpu_hours": None}, "q")
    assert dict(quota.limits) == {("usd", "week"): 3.0}
    assert quota.unlimited == {("usd", "day"), ("usd", "month")}


@pytest.mark.parametrize(
    ("used", "near", "exceeded"),
    [
        (0.0, False, False),
        (8.9, False, False),
        (9.0, True, False),  # 90% of 10
        (9.99, True, False),
        (10.0, False, True),  # 100%: used up
        (12.0, False, True),
    ],
)
def test_thresholds(used: float, near: bool, exceeded: bool) -> None:
    quota = Quota({("usd", "day"): 10.0}, "default")
    status = evaluate("x", quota, {"day": {"usd": used}}, NOW)
    assert bool(status.near(0.9)) == near
    assert bool(status.exceeded) == exceeded


def test_a_zero_limit_is_used_up_from_the_start() -> None:
    status = evaluate("x", Quota({("usd", "month"): 0.0}, "default"), {}, NOW)
    assert status.exceeded and "resets Tuesday 2026-12-01 00:00 UTC" in status.limits[0].sentence()


def test_sentences_say_what_remains_and_when_it_resets() -> None:
    quota = Quota({("gpu_hours", "week"): 30.0, ("usd", "day"): 20.0}, "group gpu-team")
    status = evaluate("bob", quota, {"week": {"gpu_hours": 12.5}, "day": {"usd": 21.0}}, NOW)
    assert [(s.metric, s.period) for s in status.limits] == [("usd", "day"), ("gpu_hours", "week")]
    week = status.limits[1]
    assert week.remaining == 17.5
    assert week.sentence() == "17.5 GPU-hours of your 30 GPU-hours left this week (resets Monday 2026-11-30 00:00 UTC)."
    refusal = status.refusal()
    assert refusal.startswith("Your GPU quota is used up: 21.00 USD of 20 USD today (group gpu-team).")
    assert "You can start a GPU server again Friday 2026-11-27 00:00 UTC" in refusal
    assert "pick a CPU profile" in refusal


def test_the_latest_reset_is_when_the_user_can_start_again() -> None:
    quota = Quota({("usd", "day"): 1.0, ("usd", "month"): 10.0}, "default")
    status = evaluate("x", quota, {"day": {"usd": 2.0}, "month": {"usd": 11.0}}, NOW)
    assert len(status.exceeded) == 2
    assert "again Tuesday 2026-12-01 00:00 UTC" in status.refusal()
    assert "1 other limit(s) are used up too" in status.refusal()


def test_no_quota_allows_everything() -> None:
    status = evaluate("x", Quota(), {"day": {"usd": 1e9}}, NOW)
    assert not status.exceeded and status.refusal() == "" and status.summary() == "No quota applies to you."
