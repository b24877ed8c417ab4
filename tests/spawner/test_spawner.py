"""Unit tests for DoLabSpawner itself (dolab_spawner.spawner), without a hub: its config check, and its state
(get_state, load_state, clear_state) through ServerState."""

from __future__ import annotations

from typing import Any

import pytest
from traitlets import TraitError
from traitlets.config import Config

from dolab_spawner import DoLabSpawner
from tests.spawner.test_form import GPU_INVENTORY, PROFILE_LIST


def test_bad_docker_hosts_is_a_config_error() -> None:
    config = Config()
    config.DoLabSpawner.docker_hosts = [{"name": "x", "url": "ftp://nope"}]
    with pytest.raises(TraitError, match=r"DoLabSpawner\.docker_hosts: docker_hosts\[0\]: url must start"):
        DoLabSpawner.check_config(config)


# ----- config check -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "phrase"),
    [
        ({"profile_list": [{"slug": "cpu"}]}, "DoLabSpawner.profile_list: profile_list[0]: display_name must be"),
        ({"profile_list": [{"display_name": "x", "gpus": "2"}]}, "DoLabSpawner.profile_list: profile 'x': gpus must"),
        (
            {"profile_list": [{"display_name": "x", "spawner_override": {"mem_limitt": "1G"}}]},
            "spawner_override sets mem_limitt, which the spawner does not have",
        ),
        ({"profile_list": "cpu"}, "The 'profile_list' trait of a DoLabSpawner instance expected a list or a callable"),
        ({"gpu_inventory": [{"index": 0, "name": "x"}]}, "DoLabSpawner.gpu_inventory: GPU entry"),
        (
            {"gpu_inventory": [*GPU_INVENTORY, GPU_INVENTORY[0]]},
            "DoLabSpawner.gpu_inventory: gpu_inventory lists the same GPU twice: local/GPU-0000",
        ),
        ({"gpu_inventory": [{"index": -1, "uuid": "GPU-0", "name": "x"}]}, "index must be a non-negative integer"),
    ],
    ids=[
        "no display_name",
        "gpus str",
        "unknown override",
        "not a list",
        "gpu missing uuid",
        "duplicate gpu",
        "negative index",
    ],
)
def test_bad_config_is_a_trait_error(section: dict[str, Any], phrase: str) -> None:
    config = Config()
    for name, value in section.items():
        config.DoLabSpawner[name] = value
    with pytest.raises(TraitError) as info:
        DoLabSpawner.check_config(config)
    assert phrase in str(info.value)
    with pytest.raises(TraitError):
        DoLabSpawner(config=config)


def test_good_config_passes_the_check() -> None:
    config = Config()
    cpu = {**PROFILE_LIST[0], "spawner_override": {"mem_limit": "2G", "python_env": "/opt/env"}}
    config.DoLabSpawner.profile_list = [cpu, *PROFILE_LIST[1:]]
    config.DoLabSpawner.gpu_inventory = GPU_INVENTORY
    DoLabSpawner.check_config(config)


def test_callable_profile_list_is_not_checked_at_start_up() -> None:
    config = Config()
    config.DoLabSpawner.profile_list = lambda spawner: [{"slug": "no display name"}]
    DoLabSpawner.check_config(config)


@pytest.mark.parametrize(
    "value",
    [{"index": 0, "uuid": "GPU-0", "name": "x"}, 5, "GPU-0"],
    ids=["one dict", "a number", "a string"],
)
def test_gpu_inventory_not_a_list(value: Any) -> None:
    config = Config()
    config.DoLabSpawner.gpu_inventory = value
    with pytest.raises(TraitError, match=r"gpu_inventory.* list"):
        DoLabSpawner.check_config(config)
