"""Unit tests for dolab_spawner.backends.docker (DockerBackend): GPU attach config, pull progress, the container's
user and security options, names and labels."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import docker.errors
import pytest
from jupyterhub.spawner import SpawnException
from traitlets.config import Config

from dolab_core.engines.docker import DockerEngines
from dolab_spawner.backends import docker as docker_backend
from dolab_spawner.backends.docker import DockerBackend

GPU = {"index": 0, "uuid": "GPU-r-0", "name": "NVIDIA A100 80GB", "memory_gb": 80}


def backend(**traits: Any) -> DockerBackend:
    return DockerBackend(config=Config(), **traits)


def test_device_requests_attach_exactly_the_slots() -> None:
    b = backend(gpu_slots=[{**GPU, "uuid": "GPU-x"}, {**GPU, "index": 3, "uuid": "GPU-y"}])
    assert b._gpu_host_config() == {"device_requests": [{"device_ids": ["GPU-x", "GPU-y"], "capabilities": [["gpu"]]}]}


def test_devices_mode_maps_nodes_and_control_devices() -> None:
    b = backend(
        gpu_slots=[{**GPU, "index": 2, "device": "/tmp/fake2"}],
        gpu_attach="devices",
        gpu_control_devices=["/dev/null", "/dev/no-such-control-device"],
    )
    # Control devices missing on this (local) host are skipped.
    assert b._gpu_host_config() == {"devices": ["/tmp/fake2:/dev/nvidia2:rwm", "/dev/null:/dev/null:rwm"]}


def test_cpu_containers_get_no_device() -> None:
    assert backend()._gpu_host_config() == {}


class StubEngine:
    """Answers the two calls pull_image makes, the way docker-py's APIClient does."""

    def __init__(self, lines: list[dict[str, Any]]):
        self.lines = lines

    def inspect_image(self, image: str) -> dict[str, Any]:
        raise docker.errors.ImageNotFound(f"No such image: {image}")

    def pull(self, repository: str, stream: bool, decode: bool) -> Iterator[dict[str, Any]]:
        assert (repository, stream, decode) == ("registry.example/lab:2.1", True, True)
        for line in self.lines:
            time.sleep(0.01)
            yield line


@pytest.fixture
def stub_engines(monkeypatch: pytest.MonkeyPatch):
    def use(lines: list[dict[str, Any]]) -> None:
        stub = StubEngine(lines)
        fresh = DockerEngines()
        monkeypatch.setattr(fresh, "client", lambda host, timeout, purpose="api": stub)
        monkeypatch.setattr(docker_backend, "engines", fresh)

    return use


async def test_pull_streams_progress_events(stub_engines) -> None:
    stub_engines([{"status": "Pulling fs layer"}, {"status": "Downloading", "progress": "[=>  ] 1MB/9MB"}])
    events: list[tuple[int, str]] = []
    b = backend(progress_callback=lambda p, m: events.append((p, m)), pull_progress_interval_seconds=0)
    await b.pull_image("registry.example/lab:2.1")
    await asyncio.sleep(0)  # the last event is handed to the loop from the pull thread
    messages = [m for _, m in events]
    assert messages[0] == "Pulling image registry.example/lab:2.1"
    assert "Pulling registry.example/lab:2.1: Downloading [=>  ] 1MB/9MB" in messages


async def test_a_failed_pull_is_a_sentence(stub_engines) -> None:
    stub_engines([{"status": "Pulling fs layer"}, {"error": "manifest unknown"}])
    with pytest.raises(SpawnException) as info:
        await backend().pull_image("registry.example/lab:2.1")
    assert "is not on this server and could not be pulled" in str(info.value.log_message)


@pytest.mark.parametrize("user", ["0", "0000", "root", "0:0", "root:root", "0:1000", "+0", ""])
def test_a_root_container_user_is_refused_before_any_pull(user: str) -> None:
    b = backend(container_user=user, hub_id="test1234")
    if not user:
        b._check_container_user()  # the image's user, checked at create time
        return
    with pytest.raises(SpawnException) as info:
        b._check_container_user()
    assert "as root" in str(info.value.log_message) or "cannot be checked" in str(info.value.log_message)


@pytest.mark.parametrize(
    ("admin", "expected"),
    [
        pytest.param({}, ["no-new-privileges"], id="none"),
        pytest.param({"security_opt": ["apparmor=lab"]}, ["apparmor=lab", "no-new-privileges"], id="kept"),
        pytest.param({"security_opt": "seccomp=/p.json"}, ["seccomp=/p.json", "no-new-privileges"], id="a-string"),
        pytest.param({"security_opt": ["no-new-privileges=false"]}, ["no-new-privileges"], id="cannot-turn-off"),
        pytest.param(
            {"security_opt": ["no-new-privileges:false", "label=level:s0"]},
            ["label=level:s0", "no-new-privileges"],
            id="old-syntax",
        ),
    ],
)
async def test_admin_security_options_are_merged(admin: dict[str, Any], expected: list[str]) -> None:
    b = backend(hub_id="test1234")
    b._admin_host_config = {**admin, "cap_drop": ["NET_RAW"]}
    config = await b._extra_host_config()
    assert config["security_opt"] == expected
    assert config["cap_drop"] == ["ALL"]


def test_names_and_labels_carry_the_hub_id() -> None:
    b = backend(hub_id="test1234", docker_host={"name": "local"}, user=SimpleNamespace(name="ann"))
    assert b.prefix == "dolab-test1234"
    labels = b._labels()
    assert labels["dolab.hub"] == "test1234" and labels["dolab.managed"] == "true"
