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
    restarted = rest.call("POST", f"/v2/pods/{pod['id']}/action", json={"action": "restart"})
    assert restarted.status_code == 200
    assert rest.wait_status(pod["id"], "RUNNING")["actions"] == ["stop", "restart", "terminate"]

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


def test_no_capacity_is_400_prose_and_the_catalog_says_none(rest: Rest) -> None:
    rest.em.faults(no_capacity=[[A100, "SECURE"]])
    rest.control("settings", {"no_capacity_dc": [[H100, "EU-RO-1"]]})
    reply = rest.create(cloud="SECURE")
    assert reply.status_code == 400 and "no longer any instances" in reply.json()["detail"]
    assert "errors" not in reply.json()  # no code, prose only
    assert rest.create(cloud="COMMUNITY").json()["cost"] == pytest.approx(1.19)
    assert rest.create(gpu={"id": H100}, dataCenterIds=["EU-RO-1"]).status_code == 400
    assert rest.create(gpu={"id": H100}, dataCenterIds=["EU-RO-1", "EU-SE-1"]).json()["dataCenterId"] == "EU-SE-1"
    assert rest.create(gpu={"id": "NVIDIA B999"}).status_code == 400

    gpus = rest.call("GET", "/v2/catalog/gpus", params={"include": "AVAILABILITY", "product": "POD", "cloud": "SECURE"})
    by_id = {g["id"]: g for g in gpus.json()["gpus"]}
    assert by_id[A100]["availability"] == "NONE" and by_id[A100]["price"] == {"secure": 1.64, "community": 1.19}
    assert {d["id"]: d["availability"] for d in by_id[H100]["dataCenters"]}["EU-RO-1"] == "NONE"
    assert by_id[H100]["availability"] == "HIGH"


def test_the_catalog(rest: Rest) -> None:
    rest.control("settings", {"availability": {H100: "LOW"}})
    assert rest.call("GET", "/v2/catalog/gpus", params={"include": "AVAILABILITY"}).status_code == 400
    plain = rest.call("GET", "/v2/catalog/gpus").json()["gpus"]
    assert A100 in [g["id"] for g in plain] and "availability" not in plain[0]
    one = rest.call("GET", "/v2/catalog/gpus/NVIDIA%20H100%2080GB%20HBM3?include=AVAILABILITY&product=POD")
    assert (one.json()["availability"], one.json()["maxCount"]) == ("LOW", 8)
    too_many = rest.call("GET", "/v2/catalog/gpus", params={"include": "AVAILABILITY", "product": "POD", "count": 9})
    assert {g["availability"] for g in too_many.json()["gpus"]} == {"NONE"}
    assert rest.call("GET", "/v2/catalog/gpus/nope").status_code == 404


def test_rate_limit_headers_and_the_budget(rest: Rest) -> None:
    rest.control("settings", {"quota_per_minute": 3})
    first = rest.call("GET", "/v2/pods")
    assert first.headers["RateLimit-Policy"] == '"minute";q=3;w=60'
    assert first.headers["RateLimit"].startswith('"minute";r=2;t=')
    rest.call("GET", "/v2/pods")
    assert rest.call("GET", "/v2/pods").headers["RateLimit"].startswith('"minute";r=0;')
    over = rest.call("GET", "/v2/pods")
    assert over.status_code == 429 and 1 <= int(over.headers["Retry-After"]) <= 60


@pytest.mark.parametrize(
    ("route", "status", "call"),
    [
        ("rest:create", 402, ("POST", "/v2/pods")),
        ("rest:action", 409, ("POST", "/v2/pods/x/action")),
        ("rest:create", 422, ("POST", "/v2/pods")),
        ("rest:get", 502, ("GET", "/v2/pods/x")),
        ("rest:delete", 503, ("DELETE", "/v2/pods/x")),
        ("rest:catalog", 500, ("GET", "/v2/catalog/gpus")),
        ("rest:logs", 403, ("GET", "/v2/pods/x/logs")),
        ("rest:list", 401, ("GET", "/v2/pods")),
    ],
    ids=lambda v: str(v) if isinstance(v, int) else None,
)
def test_faults_per_route_are_problems(rest: Rest, route: str, status: int, call: tuple[str, str]) -> None:
    rest.em.faults(replies=[{"field": route, "status": status}])
    reply = rest.call(*call, json={})
    assert reply.status_code == status and reply.headers["Content-Type"] == "application/problem+json"
    assert reply.json()["status"] == status and reply.json()["detail"]
    assert rest.call("GET", "/v2/catalog/gpus").status_code == 200  # other routes untouched


def test_429_non_json_and_slow_faults(rest: Rest) -> None:
    rest.control("settings", {"retry_after_seconds": 7})
    html = {"status": 502, "body": "<html>Bad Gateway</html>", "content_type": "text/html"}
    rest.em.faults(
        replies=[
            {"field": "rest:list", "status": 429},
            {"field": "rest:list", **html},
            {"field": "rest:list", "delay_seconds": 0.5},
        ]
    )
    limited = rest.call("GET", "/v2/pods")
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    broken = rest.call("GET", "/v2/pods")
    assert (broken.status_code, broken.text) == (502, "<html>Bad Gateway</html>")
    start = time.monotonic()
    assert rest.call("GET", "/v2/pods").json() == {"pods": []}
    assert time.monotonic() - start >= 0.5
    statuses = [(r["fields"], r["status"]) for r in rest.em.requests()]
    assert statuses == [(["rest:list"], 429), (["rest:list"], 502), (["rest:list"], 200)]


def test_a_create_that_lands_after_the_client_gave_up(rest: Rest) -> None:
    rest.control("late-create", {"land_after_seconds": 1.0, "status": 504, "delay_seconds": 0.2})
    assert rest.create("dolab-late").status_code == 504
    assert rest.call("GET", "/v2/pods").json()["pods"] == []
    deadline = time.monotonic() + patience(10)
    while not rest.call("GET", "/v2/pods").json()["pods"] and time.monotonic() < deadline:
        time.sleep(0.05)
    (pod,) = rest.call("GET", "/v2/pods").json()["pods"]
    assert pod["name"] == "dolab-late"


def test_a_201_whose_pod_reads_404_until_it_lands(rest: Rest) -> None:
    rest.control("late-create", {"land_after_seconds": 1.0, "status": 201})
    pod = rest.create("dolab-late-201").json()
    assert rest.call("GET", f"/v2/pods/{pod['id']}").status_code == 404
    assert rest.call("GET", "/v2/pods").json()["pods"] == []
    assert rest.wait_status(pod["id"], "RUNNING")["name"] == "dolab-late-201"


def test_logs_and_a_vanished_pod(rest: Rest) -> None:
    pod = rest.create().json()
    rest.control("logs", {"pod_id": pod["id"], "lines": ["one", "two", "Running as root is not recommended"]})
    logs = rest.call("GET", f"/v2/pods/{pod['id']}/logs", params={"tail": 2})
    assert logs.headers["Content-Type"] == "text/event-stream"
    assert logs.text == "data: two\n\ndata: Running as root is not recommended\n\n"
    rest.em.vanish(pod["id"])
    assert rest.call("GET", f"/v2/pods/{pod['id']}").status_code == 404
    assert rest.call("GET", f"/v2/pods/{pod['id']}/logs").status_code == 404


@pytest.mark.docker
def test_a_rest_pod_is_a_container_with_its_log(clean_emulator: EmulatorProcess) -> None:
    rest = Rest(clean_emulator)
    rest.control("reset", {})
    body = {"args": "python3 -m http.server 8888", "image": "dolab-singleuser-test:latest"}
    pod = rest.create("dolab-rest-container", **body).json()
    try:
        running = rest.wait_status(pod["id"], "RUNNING", timeout=60)
        (port,) = running["runtime"]["ports"]
        deadline = time.monotonic() + patience(30)
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port['public']}/", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        logs = rest.call("GET", f"/v2/pods/{pod['id']}/logs")
        assert logs.status_code == 200 and '"GET / HTTP/1.1" 200' in logs.text
    finally:
        assert rest.call("DELETE", f"/v2/pods/{pod['id']}").status_code == 204
