"""DoLabSpawner and plans, without a hub: the form shows only the plan's profiles, the rest is refused (403)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from bs4 import BeautifulSoup
from jupyterhub.spawner import SpawnException
from traitlets import TraitError
from traitlets.config import Config

import dolab_spawner.reservations
from dolab_spawner import DoLabSpawner

PROFILES: list[dict[str, Any]] = [
    {"display_name": "CPU only", "slug": "cpu", "default": True},
    {"display_name": "One A100", "slug": "a100", "gpus": 1, "gpu_type": "A100"},
    {"display_name": "One H100", "slug": "h100", "gpus": 1, "gpu_type": "H100"},
]
INVENTORY = [{"index": 0, "uuid": "GPU-0", "name": "NVIDIA A100 80GB", "memory_gb": 80}]
PLANS = {
    "plans": {
        "cpu": {"profiles": ["cpu"], "max_run_hours": 24},
        "gpu": {"profiles": ["cpu", "a100"], "max_run_hours": 72},
        "staff": {"profiles": "*", "max_run_hours": None},
        "none": {"profiles": []},
    },
    "groups": {"students": "cpu", "researchers": "gpu", "staff": "staff", "guests": "none"},
}


@pytest.fixture(autouse=True)
def fresh_pool() -> Iterator[None]:
    saved = DoLabSpawner._pool
    DoLabSpawner._pool = dolab_spawner.reservations.SlotPool()
    try:
        yield
    finally:
        DoLabSpawner._pool = saved


def spawner_for(*groups: str, plans: Any = PLANS) -> DoLabSpawner:
    config = Config()
    config.DoLabSpawner.profile_list = PROFILES
    config.DoLabSpawner.gpu_inventory = INVENTORY
    config.DoLabSpawner.max_run_hours = 168
    config.DoLabSpawner.plans = plans
    spawner = DoLabSpawner(config=config)
    spawner.user = SimpleNamespace(name="ana", groups=[SimpleNamespace(name=g) for g in groups])
    return spawner


async def card_slugs(spawner: DoLabSpawner) -> list[str]:
    soup = BeautifulSoup(await spawner.render_options_form(), "html.parser")
    return [div["data-profile"] for div in soup.find_all("div", class_="dolab-profile")]


@pytest.mark.parametrize(
    ("groups", "slugs"),
    [
        pytest.param(["students"], ["cpu"], id="cpu-plan"),
        pytest.param(["researchers"], ["cpu", "a100"], id="gpu-plan"),
        pytest.param(["students", "researchers"], ["cpu", "a100"], id="union"),
        pytest.param(["staff"], ["cpu", "a100", "h100"], id="star"),
    ],
)
async def test_form_shows_only_the_plans_profiles(groups: list[str], slugs: list[str]) -> None:
    assert await card_slugs(spawner_for(*groups)) == slugs


async def test_no_plans_shows_everything() -> None:
    assert await card_slugs(spawner_for("students", plans={})) == ["cpu", "a100", "h100"]


async def test_a_profile_outside_the_plan_is_refused_with_403() -> None:
    spawner = spawner_for("students")
    spawner.user_options = {"profile": "cpu"}
    spawner.user_options = {"profile": "a100"}
    with pytest.raises(SpawnException) as e:
        await spawner.start()
    assert e.value.status_code == 403
    assert e.value.message == (
        "Your plan does not include the profile 'One A100' (a100). You can start: cpu. Ask an administrator if you "
        "need it."
    )
    assert spawner.user_options == {"profile": "cpu"}  # the refused options do not replace the stored ones
    assert spawner.allocator.holders() == {}


async def test_the_form_refuses_it_too() -> None:
    spawner = spawner_for("students")
    with pytest.raises(ValueError, match=r"Your plan does not include the profile 'One A100' \(a100\)"):
        await spawner.options_from_form({"profile": ["a100"], "stop_mode": ["none"]})


async def test_unknown_profiles_still_get_the_400_list() -> None:
    spawner = spawner_for("students")
    spawner.user_options = {"profile": "cpu"}
    spawner.user_options = {"profile": "nope"}
    with pytest.raises(SpawnException) as e:
        await spawner.start()
    assert e.value.status_code == 400
    assert "Unknown profile 'nope'. Choose one of: cpu." in e.value.message


async def test_a_plan_without_profiles_says_so() -> None:
    spawner = spawner_for("guests")
    with pytest.raises(SpawnException) as e:
        await spawner.render_options_form()
    assert e.value.status_code == 403
    assert "Your plan does not include any profile" in e.value.message


@pytest.mark.parametrize(
    ("groups", "hours"),
    [
        pytest.param(["students"], 24, id="plan-lowers"),
        pytest.param(["students", "researchers"], 72, id="most-generous"),
        pytest.param(["staff"], 168, id="null-keeps-spawner-max"),
    ],
)
async def test_plan_max_run_hours(groups: list[str], hours: float) -> None:
    spawner = spawner_for(*groups)
    assert spawner.user_max_run_hours() == hours
    await spawner.options_from_form({"profile": ["cpu"], "stop_mode": ["hours"], "run_hours": [str(hours)]})
    with pytest.raises(ValueError, match=f"at most {hours:g} hours"):
        await spawner.options_from_form({"profile": ["cpu"], "stop_mode": ["hours"], "run_hours": [str(hours + 1)]})


def test_bad_plans_stop_the_hub_at_start_up() -> None:
    config = Config()
    config.DoLabSpawner.plans = {"plans": {"cpu": {"profiles": "cpu"}}}
    with pytest.raises(TraitError, match=r"DoLabSpawner\.plans: plan 'cpu': profiles must be a list"):
        DoLabSpawner.check_config(config)
