"""The emulator itself, driven by the real runpod SDK: what a pod looks like over its life, and each fault."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import requests
import runpod
import runpod.error

from tests.e2e.stack import docker_stack
from tests.patience import patience
from tests.runpod_emulator.client import EmulatorProcess

pytestmark = [pytest.mark.docker]

A100 = "NVIDIA A100 80GB PCIe"
IMAGE = "dolab-singleuser-test:latest"


@pytest.fixture
def sdk(clean_emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The SDK pointed at the emulator (its base URL from the environment, its key as the module global)."""
    old_url, old_key = os.environ.get("RUNPOD_API_BASE_URL"), runpod.api_key
    os.environ["RUNPOD_API_BASE_URL"] = clean_emulator.url
    runpod.api_key = clean_emulator.api_key
    yield clean_emulator
    runpod.api_key = old_key
    if old_url is None:
        os.environ.pop("RUNPOD_API_BASE_URL", None)
    else:
        os.environ["RUNPOD_API_BASE_URL"] = old_url


def wait_for(check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + patience(timeout)
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError("condition not reached")


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def test_a_pod_is_a_container_with_runtime_only_once_it_runs(sdk: EmulatorProcess) -> None:
    sdk.faults(boot_seconds=1.5)
    pod = runpod.create_pod(
        "dolab-emu-life",
        IMAGE,
        A100,
        cloud_type="SECURE",
        ports="8888/http",
        env={"GREETING": "say hi"},
        docker_args="python3 -m http.server 8888",
    )
    assert set(pod) == {"id", "imageName", "env", "machineId", "machine"}  # no status, no runtime: poll
    first = runpod.get_pod(pod["id"])
    assert first["desiredStatus"] == "RUNNING" and first["runtime"] is None
    running = wait_for(lambda: (runpod.get_pod(pod["id"]) or {}).get("runtime") and runpod.get_pod(pod["id"]))
    assert first["costPerHr"] == pytest.approx(1.64)
    (port,) = running["runtime"]["ports"]
    assert (port["privatePort"], port["type"], port["ip"]) == (8888, "http", "127.0.0.1")
    assert "GREETING=say hi" in running["env"]
    assert wait_for(lambda: answers(f"http://127.0.0.1:{port['publicPort']}/"))

    engine = docker.DockerClient(base_url=docker_stack().docker_host)
    (container,) = engine.containers.list(filters={"label": f"runpod.pod-id={pod['id']}"})
    assert container.attrs["Config"]["Cmd"] == ["python3", "-m", "http.server", "8888"]
    assert container.attrs["Config"]["Image"] == IMAGE

    assert runpod.stop_pod(pod["id"]) == {"id": pod["id"], "desiredStatus": "EXITED"}
    assert runpod.get_pod(pod["id"])["desiredStatus"] == "EXITED"
    assert runpod.resume_pod(pod["id"], 1)["desiredStatus"] == "RUNNING"
    wait_for(lambda: runpod.get_pod(pod["id"])["runtime"] and engine.containers.list(filters={"id": container.id}))
    assert [p["id"] for p in runpod.get_pods()] == [pod["id"]]
    runpod.terminate_pod(pod["id"])
    assert runpod.get_pod(pod["id"]) is None
    assert engine.containers.list(all=True, filters={"label": f"runpod.pod-id={pod['id']}"}) == []


def test_no_capacity_per_gpu_type_and_cloud(sdk: EmulatorProcess) -> None:
    sdk.faults(no_capacity=[[A100, "SECURE"]])
    with pytest.raises(runpod.error.QueryError, match="no longer any instances available"):
        runpod.create_pod("dolab-emu-cap", IMAGE, A100, cloud_type="SECURE", ports="8888/http")
    pod = runpod.create_pod("dolab-emu-cap", IMAGE, A100, cloud_type="ALL", ports="8888/http")
    try:
        assert runpod.get_pod(pod["id"])["costPerHr"] == pytest.approx(1.19)  # the community cloud had room
    finally:
        runpod.terminate_pod(pod["id"])


def test_injected_replies_and_the_request_log(sdk: EmulatorProcess) -> None:
    sdk.faults(
        replies=[
            {"field": "pod", "status": 429, "body": "<html>Too Many Requests</html>", "content_type": "text/html"},
            {"field": "pod", "status": 500, "body": '{"errors": [{"message": "Something went wrong."}]}'},
        ]
    )
    with pytest.raises(requests.exceptions.JSONDecodeError):
        runpod.get_pod("nope")
    with pytest.raises(runpod.error.QueryError, match="Something went wrong"):
        runpod.get_pod("nope")
    assert runpod.get_pod("nope") is None
    runpod.api_key = "wrong"
    with pytest.raises(runpod.error.AuthenticationError):
        runpod.get_gpus()
    assert [(r["fields"], r["status"]) for r in sdk.requests()] == [
        (["pod"], 429),
        (["pod"], 500),
        (["pod"], 200),
        ([], 401),
    ]


def test_an_unescaped_quote_breaks_the_document_as_at_runpod(sdk: EmulatorProcess) -> None:
    with pytest.raises(runpod.error.QueryError, match="Syntax Error"):
        runpod.create_pod('dolab "quoted"', IMAGE, A100)
    assert sdk.pods() == []


def test_a_pod_can_vanish(sdk: EmulatorProcess) -> None:
    pod = runpod.create_pod("dolab-emu-vanish", IMAGE, A100, ports="8888/http", docker_args="sleep 600")
    wait_for(lambda: runpod.get_pod(pod["id"])["runtime"])
    sdk.vanish(pod["id"])
    assert runpod.get_pod(pod["id"]) is None
    engine = docker.DockerClient(base_url=docker_stack().docker_host)
    assert engine.containers.list(all=True, filters={"label": f"runpod.pod-id={pod['id']}"}) == []
