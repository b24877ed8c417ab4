"""End to end on real Docker Engines: a real hub, real proxy, containers from the locally built test image.

Two engines stand for two GPU machines (tests/stack.py starts them). GPUs are fake: a static inventory and one
device node per GPU (``gpu_attach = "devices"``), so what each container sees is checked for real.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from .hub import Hub, free_port
from .jupyter import run_in_kernel
from .stack import DockerStack, docker_stack

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

LEAK_CANARY = "dolab-canary-secret-8d41"
PROBE = (
    "import json, os; print(json.dumps({'dev': sorted(f for f in os.listdir('/dev') if f.startswith('nvidia')),"
    " 'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'), 'uid': os.getuid(), 'cwd': os.getcwd()}))"
)


def fake_gpus(dev_dir: Path, host: str, names: list[str]) -> list[dict[str, Any]]:
    """An inventory entry and a device node (a copy of /dev/null) per GPU."""
    gpus = []
    for index, name in enumerate(names):
        node = dev_dir / f"{host}-nvidia{index}"
        if not node.exists():
            os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))
        gpus.append({"index": index, "uuid": f"GPU-{host}-{index}", "name": name, "memory_gb": 16, "device": str(node)})
    return gpus


@pytest.fixture(scope="module")
def stack() -> DockerStack:
    return docker_stack()


@pytest.fixture(scope="module")
def hub(stack: DockerStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("docker-hub")
    dev = root / "dev"
    dev.mkdir()
    hub_port = free_port()
    image_choices = {
        "base": {"display_name": "Base", "default": True, "spawner_override": {"image": stack.image}},
        "alt": {"display_name": "Alternative", "spawner_override": {"image": "dolab-singleuser-test:alt"}},
    }
    profiles = [
        {"display_name": "Docker CPU", "slug": "dcpu", "backend": "docker", "default": True},
        {
            "display_name": "Docker A100",
            "slug": "dgpu",
            "backend": "docker",
            "gpus": 1,
            "gpu_type": "A100",
            "spawner_override": {"mem_limit": "1G", "cpu_limit": 1.5},
            "profile_options": {"image": {"display_name": "Image", "choices": image_choices}},
        },
        {
            "display_name": "Missing image",
            "slug": "missing",
            "backend": "docker",
            "gpus": 1,
            "gpu_type": "A100",
            # never: the image is not here, and no registry may be asked for it
            "spawner_override": {"image": "dolab-test-missing:nope", "pull_policy": "never"},
        },
        {
            "display_name": "Dies at start",
            "slug": "dies",
            "backend": "docker",
            "gpus": 1,
            "gpu_type": "A100",
            "spawner_override": {"cmd": ["/bin/false"]},
        },
        {
            "display_name": "Toolkit GPU",
            "slug": "toolkit",
            "backend": "docker",
            "gpus": 1,
            "gpu_type": "A100",
            "spawner_override": {"gpu_attach": "device_requests"},
        },
        {"display_name": "Root", "slug": "root", "backend": "docker", "spawner_override": {"container_user": "0"}},
        {"display_name": "T4 on a dead engine", "slug": "t4", "backend": "docker", "gpus": 1, "gpu_type": "T4"},
    ]
    docker_hosts = [
        {"name": "local", "url": stack.docker_host},
        {
            # A second machine, reached as a remote one would be: TCP with mutual TLS.
            "name": "second",
            "url": stack.docker_host_2_tls,
            "tls": dict(stack.tls_2),
            "gpu_inventory": fake_gpus(dev, "second", ["NVIDIA A100 80GB"] * 2),
            "hub_connect_url": f"http://{stack.bridge_ip_2}:{hub_port}",
            "workspace": "volume",
        },
        {
            "name": "dead",
            "url": "unix:///run/dolab-no-such-engine.sock",
            "gpu_inventory": [{"index": 0, "uuid": "GPU-dead-0", "name": "Tesla T4", "memory_gb": 16}],
        },
    ]
    overlay = f"""
c.DoLabSpawner.profile_list = {profiles!r}
c.DoLabSpawner.gpu_inventory = {fake_gpus(dev, "local", ["NVIDIA A100 80GB"] * 2)!r}
c.DoLabSpawner.docker_hosts = {docker_hosts!r}
c.DockerSpawner.image = {stack.image!r}
c.DockerSpawner.extra_create_kwargs = {{"labels": {{"dolab.test": "1"}}}}
c.DockerBackend.gpu_attach = "devices"
c.DockerBackend.gpu_control_devices = []
c.DockerBackend.docker_timeout_seconds = 10
"""
    env = {
        "DOLAB_HUB_IP": "0.0.0.0",
        "DOLAB_HUB_PORT": str(hub_port),
        "RUNPOD_API_KEY": LEAK_CANARY,
        "AWS_SECRET_ACCESS_KEY": LEAK_CANARY,
    }
    hub = Hub(root, overlay=overlay, env=env).start()
    yield hub
    hub.shutdown()
    for url in (stack.docker_host, stack.docker_host_2):
        client = docker.DockerClient(base_url=url)
        for container in client.containers.list(all=True, filters={"label": "dolab.test=1"}):
            container.remove(force=True)


def engine(url: str) -> docker.DockerClient:
    return docker.DockerClient(base_url=url, timeout=30)


def probe(hub: Hub, user: str) -> dict[str, Any]:
    return json.loads(run_in_kernel(hub.url, user, hub.user_token(user), PROBE))


def container_of(hub: Hub, user: str) -> tuple[str, str]:
    """(docker host name, container id) from the server's state."""
    state = hub.user(user)["servers"][""]["state"]
    return state["host"], state["backend_state"]["object_id"]


def held_slots(hub: Hub) -> dict[str, str]:
    held = {}
    for user in hub.users():
        for name, server in user["servers"].items():
            for slot in (server.get("state") or {}).get("slots", []):
                held[f"{slot['host']}/{slot['uuid']}"] = f"{user['name']}/{name}"
    return held


def dolab_containers(stack: DockerStack, user: str) -> list[Any]:
    found = []
    for url in (stack.docker_host, stack.docker_host_2):
        found += engine(url).containers.list(all=True, filters={"label": f"dolab.user={user}"})
    return found


def spawn_all(hub: Hub, users: list[str], options: dict[str, Any]) -> dict[str, Any]:
    barrier = threading.Barrier(len(users))
    replies: dict[str, Any] = {}

    def spawn(user: str) -> None:
        barrier.wait()
        replies[user] = hub.start_server(user, options)

    threads = [threading.Thread(target=spawn, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return replies


def test_gpu_containers_across_two_engines_restart_and_release(hub: Hub, stack: DockerStack) -> None:
    users = ["ann", "ben", "cat", "dan", "eve"]
    for user in users:
        hub.create_user(user)
    replies = spawn_all(hub, users, {"profile": "dgpu"})
    started = sorted(u for u, r in replies.items() if r.status_code in (201, 202))
    refused = [u for u, r in replies.items() if r.status_code == 409]
    assert len(started) == 4 and len(refused) == 1, {u: (r.status_code, r.text) for u, r in replies.items()}
    assert "All 4 A100 GPU(s) are in use" in replies[refused[0]].json()["message"]

    seen = {}
    for user in started:
        hub.wait_ready(user)
        host, container_id = container_of(hub, user)
        info = probe(hub, user)
        slot = hub.user(user)["servers"][""]["state"]["slots"][0]
        assert info["dev"] == [f"nvidia{slot['index']}"], f"{user} must see exactly its own GPU node: {info}"
        assert info["cuda"] == slot["uuid"]
        assert info["uid"] == 1000
        assert engine(stack.docker_host if host == "local" else stack.docker_host_2).containers.get(container_id)
        seen[user] = (host, slot["uuid"])
    assert len(set(seen.values())) == 4, seen
    assert sorted(h for h, _ in seen.values()) == ["local", "local", "second", "second"]

    ids = {u: container_of(hub, u) for u in started}
    hub.restart()
    for user in started:
        hub.wait_ready(user)
        assert container_of(hub, user) == ids[user], "the container must survive the hub restart"
        assert probe(hub, user)["cuda"] == seen[user][1]
    assert hub.start_server(refused[0], {"profile": "dgpu"}).status_code == 409

    hub.stop_server(started[0])
    assert not dolab_containers(stack, started[0]), "a stopped server's container is removed"
    reply = hub.start_server(refused[0], {"profile": "dgpu"})
    assert reply.status_code in (201, 202), reply.text
    hub.wait_ready(refused[0])
    assert (container_of(hub, refused[0])[0], probe(hub, refused[0])["cuda"]) == seen[started[0]]
    for user in [*started[1:], refused[0]]:
        hub.stop_server(user)
    assert held_slots(hub) == {}


def test_container_is_hardened_and_carries_no_secret(hub: Hub, stack: DockerStack) -> None:
    hub.create_user("fay")
    assert hub.start_server("fay", {"profile": "dgpu"}).status_code in (201, 202)
    hub.wait_ready("fay")
    host, container_id = container_of(hub, "fay")
    assert host == "local"
    attrs = engine(stack.docker_host).api.inspect_container(container_id)
    mounts = attrs["Mounts"]
    assert not any("docker.sock" in (m.get("Source", "") + m.get("Destination", "")) for m in mounts)
    env = dict(line.split("=", 1) for line in attrs["Config"]["Env"])
    assert not any(LEAK_CANARY in value for value in env.values()), "a hub secret reached the container"
    assert not {"CONFIGPROXY_AUTH_TOKEN", "JPY_COOKIE_SECRET", "RUNPOD_API_KEY", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert env["JUPYTERHUB_API_TOKEN"], "the server's own token is the one secret it gets"
    config = attrs["HostConfig"]
    assert config["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in config["SecurityOpt"]
    assert config["Memory"] == 2**30
    assert config["CpuQuota"] == 150_000 and config["CpuPeriod"] == 100_000
    assert attrs["Config"]["Labels"]["dolab.test"] == "1", "the admin's labels are kept"
    assert attrs["Config"]["Labels"]["dolab.user"] == "fay"
    assert attrs["Config"]["Labels"]["dolab.managed"] == "true"

    # The workspace is the host directory, mounted where the server starts.
    info = probe(hub, "fay")
    assert info["cwd"] == "/home/jovyan/work" and info["uid"] == 1000
    run_in_kernel(hub.url, "fay", hub.user_token("fay"), "open('hello.txt', 'w').write('hi')")
    assert (hub.data_dir / "workspaces" / "fay" / "hello.txt").read_text() == "hi"
    hub.stop_server("fay")


def test_image_choice_is_offered_not_typed(hub: Hub, stack: DockerStack) -> None:
    hub.create_user("gus")
    reply = hub.start_server("gus", {"profile": "dgpu", "image": "ubuntu:latest"})
    assert reply.status_code == 400
    assert "not a choice for 'image'" in reply.json()["message"]
    assert not dolab_containers(stack, "gus")
    assert hub.start_server("gus", {"profile": "dgpu", "image": "alt"}).status_code in (201, 202)
    hub.wait_ready("gus")
    host, container_id = container_of(hub, "gus")
    url = stack.docker_host if host == "local" else stack.docker_host_2
    assert engine(url).api.inspect_container(container_id)["Config"]["Image"] == "dolab-singleuser-test:alt"
    hub.stop_server("gus")


@pytest.mark.parametrize(
    ("profile", "status", "phrase"),
    [
        pytest.param("missing", 503, "is not on this server and could not be pulled", id="image-missing"),
        pytest.param("dies", 503, "exited during start-up", id="container-dies"),
        pytest.param("toolkit", 503, "cannot attach GPUs", id="no-nvidia-toolkit"),
        pytest.param("root", 503, "as root", id="root-container"),
        pytest.param("t4", 503, "is not answering", id="engine-down"),
    ],
)
def test_failures_are_sentences_and_leave_nothing(
    hub: Hub, stack: DockerStack, profile: str, status: int, phrase: str
) -> None:
    hub.create_user("hal")
    reply = hub.start_server("hal", {"profile": profile})
    assert reply.status_code == status, reply.text
    assert phrase in reply.json()["message"]
    assert hub.user("hal")["servers"] == {}
    assert held_slots(hub) == {}
    assert not dolab_containers(stack, "hal"), "nothing may be left running"


def test_container_dead_while_hub_down_frees_its_slot(hub: Hub, stack: DockerStack) -> None:
    hub.create_user("ivo")
    assert hub.start_server("ivo", {"profile": "dgpu"}).status_code in (201, 202)
    hub.wait_ready("ivo")
    host, container_id = container_of(hub, "ivo")
    hub.stop()
    engine(stack.docker_host if host == "local" else stack.docker_host_2).containers.get(container_id).kill()
    hub.start()
    assert hub.user("ivo")["servers"] == {}
    assert held_slots(hub) == {}


def test_cpu_container_sees_no_gpu(hub: Hub, stack: DockerStack) -> None:
    hub.create_user("jo")
    assert hub.start_server("jo", {}).status_code in (201, 202)
    hub.wait_ready("jo")
    info = probe(hub, "jo")
    assert info["dev"] == [] and info["cuda"] == ""
    hub.stop_server("jo")
