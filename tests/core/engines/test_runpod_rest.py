"""dolab_core/engines/runpod_rest.py: the pure mappings here, the client over loopback HTTP against the emulator."""

from __future__ import annotations

import json

import pytest

from dolab_core.engines.runpod import ApiError, BadApiKey, NoCapacity, PodSpec, TransientError
from dolab_core.engines.runpod_rest import (
    Conflict,
    CreatePodRequest,
    InsufficientBalance,
    InvalidRequest,
    PodNotFound,
    RateBudget,
    error_for,
    gpu_offer,
    parse_rate_limit,
    pod_info,
    retry_after_seconds,
)

NO_CAPACITY = (
    "There are no longer any instances available with the requested specifications. Please refresh and try again."
)


def problem(status: int, detail: str, errors: list[str] | None = None) -> bytes:
    """An RFC 9457 body as RunPod sends it."""
    return json.dumps(
        {"title": "t", "status": status, "detail": detail, **({"errors": errors} if errors else {})}
    ).encode()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, problem(400, NO_CAPACITY), NoCapacity),
        (400, problem(400, "'X' is not a GPU type."), ApiError),
        (401, problem(401, "The API key is missing or not valid."), BadApiKey),
        (403, problem(403, "No access to this pool."), BadApiKey),
        (402, problem(402, "Your balance is too low to create this pod."), InsufficientBalance),
        (404, problem(404, "No pod with this id."), PodNotFound),
        (409, problem(409, "Not allowed in the pod's status."), Conflict),
        (422, problem(422, "Schema.", ["unknown field gpuTypeIds"]), InvalidRequest),
        (429, problem(429, "Too many requests."), TransientError),
        (429, b"", TransientError),
        (500, problem(500, "Something went wrong."), TransientError),
        (502, b"<html>Bad gateway</html>", TransientError),
        (418, b"not json", ApiError),
    ],
    ids=[
        "400-no-capacity",
        "400-rule",
        "401",
        "403",
        "402",
        "404",
        "409",
        "422",
        "429",
        "429-empty",
        "500",
        "502-html",
        "418-not-json",
    ],
)
def test_error_for_maps_each_status(status: int, body: bytes, expected: type[Exception]) -> None:
    error = error_for(status, body, "application/problem+json")
    assert type(error) is expected
    assert str(error).strip()


def test_error_for_keeps_validation_messages() -> None:
    error = error_for(422, problem(422, "The request body does not match the schema.", ["bidPerGpu is unknown"]))
    assert "bidPerGpu is unknown" in str(error)


def test_parse_rate_limit_reads_every_window() -> None:
    header = '"minute";r=58;t=42, "hour";r=2990;t=1800, "day";r=0;t=7200'
    assert parse_rate_limit(header) == [("minute", 58, 42.0), ("hour", 2990, 1800.0), ("day", 0, 7200.0)]
    assert parse_rate_limit("garbage") == []


@pytest.mark.parametrize(("value", "seconds"), [("3", 3.0), (None, 1.0), ("Wed, 21 Oct 2026 07:28:00 GMT", 1.0)])
def test_retry_after_seconds(value: str | None, seconds: float) -> None:
    assert retry_after_seconds(value) == seconds


def test_rate_budget_holds_when_a_window_is_spent() -> None:
    budget = RateBudget()
    assert budget.delay_seconds() == 0
    budget.update('"minute";r=5;t=30')
    assert budget.remaining == 5 and budget.delay_seconds() == 0 and budget.remaining == 4
    budget.update('"minute";r=0;t=30, "hour";r=100;t=900')
    assert 29 < budget.delay_seconds() <= 30
    later = RateBudget()
    later.hold(2)
    assert 1 < later.delay_seconds() <= 2


def test_create_request_from_spec_sends_only_v2_fields() -> None:
    spec = PodSpec(
        name="dolab-x",
        image="img:1",
        gpu_type_id="NVIDIA A100 80GB PCIe",
        gpu_count=2,
        cloud_type="ALL",
        volume_gb=50,
        ports="8888/http, 22/tcp",
        env={"TOKEN": "s"},
        docker_args="start.sh",
    )
    request = CreatePodRequest.from_spec(spec, data_center_ids=("EU-RO-1",))
    body = request.body()
    assert body == {
        "name": "dolab-x",
        "image": "img:1",
        "gpu": {"id": "NVIDIA A100 80GB PCIe", "count": 2},
        "cloud": "SECURE",  # v2 has no ALL
        "disk": 20,
        "ports": ["8888/http", "22/tcp"],
        "env": {"TOKEN": "s"},
        "dataCenterIds": ["EU-RO-1"],
        "mounts": {"persistent": {"size": 50, "path": "/workspace"}},
        "args": "start.sh",
    }
    assert "TOKEN" not in repr(request)  # the env holds the server's token
    network = CreatePodRequest(name="n", image="i", gpu_id="g", network_volume_id="vol1").body()
    assert network["mounts"] == {"network": [{"volumeId": "vol1", "path": "/workspace"}]}


def test_pod_info_reads_a_v2_pod() -> None:
    raw = {
        "id": "p1",
        "name": "dolab-x",
        "status": "RUNNING",
        "image": "img:1",
        "gpu": {"id": "NVIDIA A100 80GB PCIe", "count": 1},
        "cost": 1.64,
        "env": {"A": "b"},
        "runtime": {"ports": [{"private": 8888, "public": 8888, "type": "http", "ip": "1.2.3.4"}]},
    }
    pod = pod_info(raw)
    assert (pod.id, pod.desired_status, pod.cost_per_hr, pod.gpu_count, pod.gpu_name) == (
        "p1",
        "RUNNING",
        1.64,
        1,
        "NVIDIA A100 80GB PCIe",
    )
    assert pod.running and pod.port(8888) is not None and pod.env == {"A": "b"}
    assert not pod_info({**raw, "runtime": {}}).running  # the create reply's empty runtime
    assert not pod_info({**raw, "status": "EXITED", "runtime": None}).running


def test_gpu_offer_reads_a_catalog_entry() -> None:
    offer = gpu_offer(
        {
            "id": "NVIDIA H100 80GB HBM3",
            "name": "H100",
            "memory": 80,
            "secure": True,
            "community": False,
            "price": {"secure": 2.99, "community": 2.5},
            "maxCount": 8,
            "availability": "LOW",
            "dataCenters": [{"id": "EU-RO-1", "availability": "LOW"}],
        }
    )
    assert offer.gpu.price("SECURE") == 2.99 and offer.gpu.price("COMMUNITY") is None
    assert (offer.availability, offer.max_count, offer.data_centers) == ("LOW", 8, (("EU-RO-1", "LOW"),))
