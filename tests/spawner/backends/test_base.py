"""Unit tests for dolab_spawner.backends (base and the registry): GPU pinning, the backend's config, profile overrides,
lazy backends, hub timeouts without a backend."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from traitlets import Dict, HasTraits, Integer, List, TraitError, Unicode
from traitlets.config import Config

from dolab_core.gpus import GpuSlot
from dolab_spawner import DoLabSpawner
from dolab_spawner.backends import backend_class
from dolab_spawner.backends.base import HUB_PROVIDED_ATTRS, apply_overrides, child_config, gpu_environment
from dolab_spawner.backends.local import LocalProcessBackend
from dolab_spawner.options import resolve_options

A100 = GpuSlot(index=0, uuid="GPU-1b2c3d4e-0000-1111-2222-333344445555", name="NVIDIA A100-SXM4-80GB", memory_gb=80)
A100_2 = GpuSlot(index=1, uuid="GPU-9f8e7d6c-0000-1111-2222-333344445555", name="NVIDIA A100-SXM4-80GB", memory_gb=80)
MIG = GpuSlot(index=2, uuid="MIG-aaaabbbb-cccc-dddd-eeee-ffff00001111", name="NVIDIA A100 MIG 1g.10gb", memory_gb=10)
FAKE = GpuSlot(index=3, uuid="fake-3", name="Fake GPU", memory_gb=0)

# ----- gpu_environment --------------------------------------------------------------------------------------

GPU_ENVIRONMENTS = [
    pytest.param(
        [],
        {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void", "DOLAB_GPUS": ""},
        id="no slots hides every GPU",
    ),
    pytest.param(
        [A100],
        {
            "CUDA_VISIBLE_DEVICES": A100.uuid,
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "NVIDIA_VISIBLE_DEVICES": A100.uuid,
            "DOLAB_GPUS": "NVIDIA A100-SXM4-80GB",
        },
        id="one GPU by its GPU- uuid",
    ),
    pytest.param(
        [MIG],
        {
            "CUDA_VISIBLE_DEVICES": MIG.uuid,
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "NVIDIA_VISIBLE_DEVICES": MIG.uuid,
            "DOLAB_GPUS": "NVIDIA A100 MIG 1g.10gb",
        },
        id="a MIG instance by its uuid",
    ),
    pytest.param(
        [FAKE],
        {
            "CUDA_VISIBLE_DEVICES": "3",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "NVIDIA_VISIBLE_DEVICES": "3",
            "DOLAB_GPUS": "Fake GPU",
        },
        id="a non-GPU- uuid falls back to the index",
    ),
    pytest.param(
        [A100, A100_2],
        {
            "CUDA_VISIBLE_DEVICES": f"{A100.uuid},{A100_2.uuid}",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "NVIDIA_VISIBLE_DEVICES": f"{A100.uuid},{A100_2.uuid}",
            "DOLAB_GPUS": "NVIDIA A100-SXM4-80GB,NVIDIA A100-SXM4-80GB",
        },
        id="two GPUs in order",
    ),
    pytest.param(
        [A100_2, FAKE],
        {
            "CUDA_VISIBLE_DEVICES": f"{A100_2.uuid},3",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "NVIDIA_VISIBLE_DEVICES": f"{A100_2.uuid},3",
            "DOLAB_GPUS": "NVIDIA A100-SXM4-80GB,Fake GPU",
        },
        id="mixed",
    ),
]


@pytest.mark.parametrize(("slots", "expected"), GPU_ENVIRONMENTS)
def test_gpu_environment(slots: list[GpuSlot], expected: dict[str, str]) -> None:
    assert gpu_environment(slots) == expected


def test_backend_env_pins_its_gpus_over_the_admins_environment() -> None:
    config = Config()
    config.LocalProcessBackend.environment = {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "KEEP": "me"}
    backend = LocalProcessBackend(
        config=config,
        gpu_slots=[A100.to_dict()],
        extra_env={"DOLAB_STOP_AT": "x"},
        # Stand-ins for what the hub sets; get_env reads their URLs and names.
        hub=SimpleNamespace(public_host="", api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/"),
        user=SimpleNamespace(name="alice", escaped_name="alice", url="/user/alice/"),
        workspace_dir="/tmp/dolab-test-workspace",
    )
    assert backend.slots == [A100]
    env = backend.get_env()
    assert env["CUDA_VISIBLE_DEVICES"] == A100.uuid
    assert env["KEEP"] == "me"
    assert env["DOLAB_STOP_AT"] == "x"


# ----- child_config -----------------------------------------------------------------------------------------


def _config() -> Config:
    config = Config()
    config.DoLabSpawner.start_timeout = 99
    config.DoLabSpawner.http_timeout = 5
    config.DoLabSpawner.environment = {"FROM": "dolab"}
    config.DoLabSpawner.profile_list = [{"display_name": "CPU"}]
    config.DoLabSpawner.max_run_hours = 12
    config.LocalProcessBackend.http_timeout = 7
    config.LocalProcessBackend.log_dir = "/var/log/dolab"
    return config


def test_child_config_sections() -> None:
    config = _config()
    child = child_config(config, LocalProcessBackend, DoLabSpawner)
    assert dict(child["LocalProcessBackend"]) == {
        "start_timeout": 99,
        "http_timeout": 7,
        "environment": {"FROM": "dolab"},
        "log_dir": "/var/log/dolab",
    }
    assert "profile_list" not in child["LocalProcessBackend"]
    assert "max_run_hours" not in child["LocalProcessBackend"]
    # The parent's own section is untouched, and so is the config passed in.
    assert child["DoLabSpawner"]["profile_list"] == [{"display_name": "CPU"}]
    assert dict(config["LocalProcessBackend"]) == {"http_timeout": 7, "log_dir": "/var/log/dolab"}


def test_child_config_reaches_the_backend() -> None:
    backend = LocalProcessBackend(config=child_config(_config(), LocalProcessBackend, DoLabSpawner))
    assert backend.start_timeout == 99, "c.DoLabSpawner.<trait> reaches the backend"
    assert backend.http_timeout == 7, "c.LocalProcessBackend.<trait> wins over c.DoLabSpawner.<trait>"
    assert backend.environment == {"FROM": "dolab"}
    assert backend.log_dir == "/var/log/dolab"
    assert not backend.has_trait("profile_list")


def test_backend_class_sections_win_over_dolabspawner() -> None:
    config = _config()
    config.LocalProcessSpawner.start_timeout = 42  # about one backend: more specific than c.DoLabSpawner
    config.Spawner.environment = {"FROM": "spawner"}  # shared by both classes: c.DoLabSpawner wins
    backend = LocalProcessBackend(config=child_config(config, LocalProcessBackend, DoLabSpawner))
    assert backend.start_timeout == 42
    assert backend.environment == {"FROM": "dolab"}


def test_child_config_follows_an_admins_subclass() -> None:
    class TeamSpawner(DoLabSpawner):
        pass

    config = _config()
    config.TeamSpawner.start_timeout = 11
    backend = LocalProcessBackend(config=child_config(config, LocalProcessBackend, TeamSpawner))
    assert backend.start_timeout == 11
    assert backend.environment == {"FROM": "dolab"}


def test_child_config_without_sections() -> None:
    child = child_config(Config(), LocalProcessBackend, DoLabSpawner)
    assert dict(child["LocalProcessBackend"]) == {}
    assert LocalProcessBackend(config=child).start_timeout == LocalProcessBackend().start_timeout


def test_child_config_does_not_share_values() -> None:
    config = _config()
    child = child_config(config, LocalProcessBackend, DoLabSpawner)
    child["LocalProcessBackend"]["environment"]["FROM"] = "changed"
    assert config.DoLabSpawner.environment == {"FROM": "dolab"}


# ----- apply_overrides --------------------------------------------------------------------------------------


class Target(HasTraits):
    environment = Dict()
    args = List()
    mem_limit = Unicode("1G")
    cpu_limit = Integer(1)


@pytest.mark.parametrize(
    ("overrides", "expected", "previous"),
    [
        (
            {"environment": {"B": "2", "A": "9"}},
            {"environment": {"A": "9", "C": "3", "B": "2"}},
            {"environment": {"A": "1", "C": "3"}},
        ),
        ({"args": ["--debug"]}, {"args": ["--debug"]}, {"args": ["--base"]}),
        (
            {"mem_limit": "64G", "cpu_limit": 8},
            {"mem_limit": "64G", "cpu_limit": 8},
            {"mem_limit": "1G", "cpu_limit": 1},
        ),
        ({"no_such_trait": 1, "cpu_limit": 2}, {"cpu_limit": 2}, {"cpu_limit": 1}),
        ({}, {}, {}),
    ],
    ids=["dict traits merge", "lists are replaced", "scalars are replaced", "unknown traits skipped", "nothing"],
)
def test_apply_overrides(overrides: dict[str, Any], expected: dict[str, Any], previous: dict[str, Any]) -> None:
    target = Target(environment={"A": "1", "C": "3"}, args=["--base"])
    old = apply_overrides(target, overrides)
    assert old == previous
    for name, value in expected.items():
        assert getattr(target, name) == value
    assert not hasattr(target, "no_such_trait")


def test_apply_overrides_copies_and_restores() -> None:
    target = Target(environment={"A": "1"})
    override = {"environment": {"B": {"nested": 1}}, "args": ["x"]}
    old = apply_overrides(target, override)
    target.environment["B"]["nested"] = 2
    target.args.append("y")
    assert override == {"environment": {"B": {"nested": 1}}, "args": ["x"]}, "the profile's data is not changed"
    for name, value in old.items():
        setattr(target, name, value)
    assert (target.environment, target.args) == ({"A": "1"}, [])


def test_apply_overrides_on_a_backend() -> None:
    backend = LocalProcessBackend(environment={"A": "1"})
    old = apply_overrides(backend, {"environment": {"B": "2"}, "python_env": "/opt/torch", "image": "ignored"})
    assert backend.environment == {"A": "1", "B": "2"}
    assert backend.python_env == "/opt/torch"
    assert old == {"environment": {"A": "1"}, "python_env": ""}


# ----- the registry and the interface ----------------------------------------------------------------------


def test_a_hub_with_only_local_profiles_imports_no_other_backend() -> None:
    """The registry imports a backend on first use: local profiles never load docker-py, dockerspawner, paramiko
    or the RunPod SDK, through the config check, the form, or the overrides' check."""
    code = """
import asyncio, sys
from traitlets.config import Config
from dolab_spawner import DoLabSpawner
c = Config()
c.DoLabSpawner.profile_list = [{"display_name": "CPU", "slug": "cpu", "spawner_override": {"python_env": "/x"}}]
c.DoLabSpawner.gpu_inventory = []
DoLabSpawner.check_config(c)
asyncio.run(DoLabSpawner(config=c).render_options_form())
print(sorted(m for m in ("docker", "dockerspawner", "paramiko", "runpod") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_an_unknown_backend_is_refused_with_the_ones_there_are() -> None:
    config = Config()
    config.DoLabSpawner.profile_list = [{"display_name": "TPU", "slug": "tpu", "backend": "tpu"}]
    with pytest.raises(TraitError, match="backend 'tpu' is not available; this install has: local, docker, runpod"):
        DoLabSpawner.check_config(config)


def test_hub_timeouts_come_from_the_config_and_the_profile_without_a_backend() -> None:
    config = Config()
    config.RunPodBackend.pod_start_timeout_seconds = 600
    pod = {"gpu_types": ["NVIDIA A100 80GB PCIe"], "image": "me/lab:1"}
    profile = {"display_name": "Pod", "slug": "pod", "backend": "runpod", "gpus": 1, "runpod": pod}
    quick = {**profile, "slug": "quick", "spawner_override": {"pod_http_timeout_seconds": 30}}
    config.DoLabSpawner.profile_list = [profile, quick]
    spawner = DoLabSpawner(config=config)
    profiles = spawner._parse_profiles(config.DoLabSpawner.profile_list)
    runpod = backend_class("runpod")
    assert runpod.hub_timeouts(spawner, resolve_options(profiles, {"profile": "pod"})) == {
        "start_timeout": 600,
        "http_timeout": 900,
    }
    assert runpod.hub_timeouts(spawner, resolve_options(profiles, {"profile": "quick"}))["http_timeout"] == 30
    assert backend_class("local").hub_timeouts(spawner, resolve_options(profiles, {"profile": "pod"})) == {}


def test_backends_get_no_user_options() -> None:
    assert "user_options" not in HUB_PROVIDED_ATTRS
