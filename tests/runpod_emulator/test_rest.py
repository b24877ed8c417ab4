"""The emulator's REST v2 routes over real HTTP on loopback, pods as records (no engine): the pod's life, the
contract's errors, the catalog, the rate budget and every fault per route."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.patience import patience
from tests.runpod_emulator.client import EmulatorProcess

A100 = "NVIDIA A100 80GB PCIe"
H100 = "NVIDIA H100 80GB HBM3"


class Rest:
    """A tiny REST v2 client for the tests, plus the emulator's controls."""

    def __init__(self, em: EmulatorProcess) -> None:
        self.em = em
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {em.api_key}"

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, f"{self.em.url}{path}", timeout=30, **kwargs)

    def create(self, name: str = "dolab-rest", **fields: Any) -> requests.Response:
        body = {"name": name, "image": "img:1", "gpu": {"id": A100, "count": 1}, "ports": ["8888/http"], **fields}
        return self.call("POST", "/v2/pods", json=body)

    def control(self, what: str, body: dict[str, Any]) -> None:
        requests.post(f"{self.em.url}/_emulator/rest/{what}", json=body, timeout=30).raise_for_status()

    def wait_status(self, pod_id: str, status: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + patience(timeout)
        while time.monotonic() < deadline:
            pod = self.call("GET", f"/v2/pods/{pod_id}").json()
            if pod.get("status") == status:
                return pod
            time.sleep(0.05)
        raise TimeoutError(f"pod {pod_id} never reached {status}")


@pytest.fixture
def rest(record_emulator: EmulatorProcess) -> Iterator[Rest]:
    """A client of the record emulator with no faults, no pods and a fresh rate window."""
    client = Rest(record_emulator)
    for em_reset in (record_emulator.reset, record_emulator.remove_all, lambda: client.control("reset", {})):
        em_reset()
    yield client
    record_emulator.reset()
    record_emulator.remove_all()
    client.control("reset", {})


def test_a_pods_life_over_rest(rest: Rest) -> None:
    created = rest.create(env={"GREETING": "hi"}, dataCenterIds=["US-TX-3"], disk=20)
    assert created.status_code == 201
    pod = created.json()
    assert (pod["name"], pod["image"], pod["gpu"], pod["cloud"]) == (
        "dolab-rest",
        "img:1",
        {"id": A100, "count": 1},
        "SECURE",
    )
    assert (pod["env"], pod["dataCenterId"], pod["disk"], pod["ports"]) == (
        {"GREETING": "hi"},
        "US-TX-3",
        20,
        ["8888/http"],
    )
    running = rest.wait_status(pod["id"], "RUNNING")
    assert running["actions"] == ["stop", "restart", "terminate"] and running["cost"] == pytest.approx(1.64)
    (port,) = running["runtime"]["ports"]
    assert (port["private"], port["type"], port["ip"]) == (8888, "http", "127.0.0.1")
    assert [p["id"] for p in rest.call("GET", "/v2/pods").json()["pods"]] == [pod["id"]]

    stopped = rest.call("POST", f"/v2/pods/{pod['id']}/action", json={"action": "stop"})
    assert stopped.status_code == 200
    assert (stopped.json()["status"], stopped.json()["cost"], stopped.json()["runtime"]) == ("EXITED", 0, None)
    again = rest.call("POST", f"/v2/pods/{pod['id']}/action", json={"action": "stop"})
    assert again.status_code == 409 and again.headers["Content-Type"] == "application/problem+json"
    assert "EXITED" in again.json()["detail"]
    assert rest.call("POST", f"/v2/pods/{pod['id']}/action", json={"action": "start"}).status_code == 200
    rest.wait_status(pod["id"], "RUNNING")

    assert rest.call("DELETE", f"/v2/pods/{pod['id']}").status_code == 204
    assert rest.call("GET", f"/v2/pods/{pod['id']}").status_code == 404
    assert rest.call("DELETE", f"/v2/pods/{pod['id']}").status_code == 404
    assert rest.em.pods() == []


def test_terminate_action_and_unknown_pods(rest: Rest) -> None:
    pod = rest.create().json()
    gone = rest.call("POST", f"/v2/pods/{pod['id']}/action", json={"action": "terminate"})
    assert gone.status_code == 204 and rest.em.pods() == []
    assert rest.call("POST", "/v2/pods/nope/action", json={"action": "stop"}).status_code == 404
    bad = rest.call("POST", "/v2/pods/nope/action", json={"action": "reset"})
    assert bad.status_code == 422


def test_the_same_pods_answer_over_graphql(rest: Rest) -> None:
    pod = rest.create().json()
    (record,) = rest.em.pods()
    assert (record["id"], record["desiredStatus"], record["env"]) == (pod["id"], "RUNNING", {})


def test_bad_key_is_401_problem(rest: Rest) -> None:
    reply = requests.get(f"{rest.em.url}/v2/pods", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert reply.status_code == 401 and reply.headers["Content-Type"] == "application/problem+json"
    assert reply.json()["status"] == 401 and reply.json()["detail"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"gpuTypeIds": [A100]}, "Unknown field 'gpuTypeIds'."),
        ({"interruptible": True}, "Unknown field 'interruptible'."),
        ({"gpu": {"id": A100, "minRamPerGpu": 8}}, "Unknown field 'gpu.minRamPerGpu'."),
        ({"env": [{"key": "A", "value": "b"}]}, "'env' has the wrong type."),
        ({"cloud": "ALL"}, "'cloud' must be SECURE or COMMUNITY."),
    ],
    ids=["v1-gpu-list", "spot", "nested-unknown", "env-list", "cloud-all"],
)
def test_schema_violations_are_422(rest: Rest, fields: dict[str, Any], message: str) -> None:
    reply = rest.create(**fields)
    assert reply.status_code == 422 and reply.headers["Content-Type"] == "application/problem+json"
    assert message in reply.json()["errors"]
    assert rest.em.pods() == []
