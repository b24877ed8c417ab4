"""The docker backend's pure parts: docker_hosts validation, GPU attach config, pools and pull progress."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import docker.errors
import pytest
from jupyterhub.spawner import SpawnException
from traitlets import TraitError
from traitlets.config import Config

from dolab_spawner import DoLabSpawner
from dolab_spawner.backends import docker as docker_backend
from dolab_spawner.backends.docker import DockerBackend, DockerEngines, check_docker_hosts, remote_slots
from dolab_spawner.slots import GpuSlot, NoFreeSlot, SlotAllocator

GPU = {"index": 0, "uuid": "GPU-r-0", "name": "NVIDIA A100 80GB", "memory_gb": 80}


@pytest.mark.parametrize(
    "hosts",
    [
        pytest.param([{"name": "local"}], id="default"),
        pytest.param([{"name": "local", "url": "unix:///var/run/docker.sock"}], id="socket"),
        pytest.param(
            [
                {"name": "local"},
                {
                    "name": "gpu-2",
                    "url": "tcp://10.0.0.2:2376",
                    "tls": {"ca_cert": "/etc/dolab/ca.pem", "client_cert": ["/c.pem", "/k.pem"], "verify": True},
                    "gpu_inventory": [GPU],
                    "hub_connect_url": "http://10.0.0.1:8081",
                    "workspace": "volume",
                },
                {"name": "gpu-3", "url": "ssh://dolab@gpu3"},
            ],
            id="three-engines",
        ),
    ],
)
def test_good_docker_hosts(hosts: list[dict[str, Any]]) -> None:
    assert check_docker_hosts(hosts) == hosts


@pytest.mark.parametrize(
    ("hosts", "phrase"),
    [
        pytest.param([], "non-empty list", id="empty"),
        pytest.param({"name": "local"}, "non-empty list", id="not-a-list"),
        pytest.param(["local"], "must be a dict", id="entry-not-dict"),
        pytest.param([{"url": "unix:///x"}], "name must be", id="no-name"),
        pytest.param([{"name": "a b"}], "name must be", id="bad-name"),
        pytest.param([{"name": "x", "host": "y"}], "unknown key(s) host", id="unknown-key"),
        pytest.param([{"name": "x", "url": "https://x"}], "url must start with", id="bad-scheme"),
        pytest.param([{"name": "x", "workspace": "nfs"}], "workspace must be", id="bad-workspace"),
        pytest.param([{"name": "x", "tls": True}], "tls must be a dict", id="bad-tls"),
        pytest.param([{"name": "x", "gpu_inventory": [{"index": 0}]}], "missing uuid, name", id="bad-gpu"),
        pytest.param([{"name": "x"}, {"name": "x"}], "names must be unique", id="duplicate"),
    ],
)
def test_bad_docker_hosts(hosts: Any, phrase: str) -> None:
    with pytest.raises(ValueError) as info:
        check_docker_hosts(hosts)
    assert phrase in str(info.value)


def test_bad_docker_hosts_is_a_config_error() -> None:
    config = Config()
    config.DoLabSpawner.docker_hosts = [{"name": "x", "url": "ftp://nope"}]
    with pytest.raises(TraitError, match=r"DoLabSpawner\.docker_hosts: docker_hosts\[0\]: url must start"):
        DoLabSpawner.check_config(config)


def test_remote_slots_belong_to_their_engine() -> None:
    hosts = [{"name": "local", "gpu_inventory": [GPU]}, {"name": "gpu-2", "gpu_inventory": [GPU]}]
    assert remote_slots(hosts) == [GpuSlot(0, "GPU-r-0", "NVIDIA A100 80GB", 80, host="gpu-2")]


def test_one_servers_gpus_are_on_one_engine() -> None:
    inventory = [
        GpuSlot(0, "GPU-a0", "A100", 80, host="a"),
        GpuSlot(0, "GPU-b0", "A100", 80, host="b"),
        GpuSlot(1, "GPU-b1", "A100", 80, host="b"),
    ]
    allocator = SlotAllocator(inventory)
    got = allocator.allocate("u/", 2, "A100")
    assert {s.host for s in got} == {"b"}
    with pytest.raises(NoFreeSlot) as info:
        allocator.allocate("v/", 2, "A100")
    assert (info.value.free, info.value.total) == (1, 3)
    assert [s.uuid for s in allocator.allocate("v/", 1, "A100", hosts=["a"])] == ["GPU-a0"]
    with pytest.raises(NoFreeSlot):
        allocator.allocate("w/", 1, "A100", hosts=["local"])


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


@pytest.mark.docker
async def test_a_long_pull_does_not_stall_other_calls() -> None:
    from tests.e2e.stack import docker_stack

    host = {"name": "pool-test", "url": docker_stack().docker_host}
    engines = DockerEngines()
    release = threading.Event()
    pull_pool = engines.pool(host, 2, purpose="pull")
    stuck = [pull_pool.submit(release.wait, 30) for _ in range(2)]  # both pull threads busy
    try:
        client = engines.client(host, 10)
        api_pool = engines.pool(host, 8)
        versions = await asyncio.gather(*(asyncio.wrap_future(api_pool.submit(client.version)) for _ in range(8)))
        assert all(v["ApiVersion"] for v in versions)
        assert not any(f.done() for f in stuck), "the API calls finished while every pull thread was still busy"
    finally:
        release.set()
