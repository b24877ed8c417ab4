"""dolab_core/engines/runpod_rest.py: the pure mappings here, the client over loopback HTTP against the emulator."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dolab_core.engines.runpod import ApiError, BadApiKey, NoCapacity, PodSpec, TransientError, UnknownGpuType
from dolab_core.engines.runpod_rest import (
    Conflict,
    CreateOutcomeUnknown,
    CreatePodRequest,
    InsufficientBalance,
    InvalidRequest,
    PodNotFound,
    RateBudget,
    RunPodRestClient,
    error_for,
    gpu_offer,
    parse_rate_limit,
    pod_info,
    retry_after_seconds,
)
from tests.runpod_emulator.client import EmulatorProcess

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
    error = error_for(status, body)
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


# The client over real HTTP against the emulator's REST v2 routes (records only, no engine).

A100 = "NVIDIA A100 80GB PCIe"


@pytest.fixture
def em(record_emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The record emulator with no faults, a fresh REST state and no pods, before and after."""
    for what in ("reset", "rest/reset"):
        record_emulator._post(what)
    yield record_emulator
    record_emulator.remove_all()
    for what in ("reset", "rest/reset"):
        record_emulator._post(what)


def client(em: EmulatorProcess, **settings: Any) -> RunPodRestClient:
    """A client of the emulator with short waits (built inside the test, on its event loop)."""
    options = {"backoff_seconds": 0.05, "request_timeout_seconds": 5.0, "create_timeout_seconds": 5.0, **settings}
    return RunPodRestClient(em.api_key, base_url=em.url, **options)


def asked(em: EmulatorProcess, route: str) -> int:
    """How many requests reached ``route`` (``rest:create``, ``rest:get``...) since the last reset."""
    return sum(1 for r in em.requests() if route in r["fields"])


def new_pod(name: str = "", **fields: Any) -> CreatePodRequest:
    return CreatePodRequest(name=name or f"dolab-rest-{secrets.token_hex(3)}", image="img:1", gpu_id=A100, **fields)


async def test_a_pod_lives_and_ends(em: EmulatorProcess) -> None:
    api = client(em)
    pod = await api.create_pod(new_pod(env={"A": "b"}))
    assert pod.gpu_name == A100 and pod.env == {"A": "b"}
    assert (await api.get_pod(pod.id)) is not None
    assert [p.id for p in await api.list_pods(pod.name)] == [pod.id]
    assert await api.list_pods("nobody-") == []
    stopped = await api.stop_pod(pod.id)
    assert stopped is not None and stopped.desired_status == "EXITED"
    with pytest.raises(Conflict):
        await api.stop_pod(pod.id)
    assert asked(em, "rest:action") == 2  # a 409 is not retried
    await api.start_pod(pod.id)
    await api.terminate_pod(pod.id)
    assert await api.get_pod(pod.id) is None
    await api.terminate_pod(pod.id)  # already gone: done
    with pytest.raises(PodNotFound):
        await api.start_pod(pod.id)
    api.close()


async def test_no_capacity_in_the_data_centres_asked(em: EmulatorProcess) -> None:
    em._post("rest/settings", {"no_capacity_dc": [[A100, "EU-RO-1"]]})
    api = client(em)
    with pytest.raises(NoCapacity):
        await api.create_pod(new_pod(data_center_ids=("EU-RO-1",)))
    assert asked(em, "rest:create") == 1
    pod = await api.create_pod(new_pod(data_center_ids=("EU-RO-1", "US-TX-3")))
    assert pod.id
    offers = {o.gpu.id: o for o in await api.gpu_catalog()}
    assert dict(offers[A100].data_centers)["EU-RO-1"] == "NONE"
    assert offers[A100].availability == "HIGH" and offers[A100].gpu.price("SECURE")
    api.close()


async def test_catalog_of_one_gpu_type(em: EmulatorProcess) -> None:
    api = client(em)
    [offer] = await api.gpu_catalog(gpu_id=A100, cloud="SECURE")
    assert offer.gpu.id == A100 and offer.max_count
    with pytest.raises(UnknownGpuType):
        await api.gpu_catalog(gpu_id="NVIDIA Nonexistent/1")
    api.close()


async def test_a_bad_key_is_refused_and_never_shown(em: EmulatorProcess) -> None:
    key = "rp_" + secrets.token_hex(12)
    api = RunPodRestClient(key, base_url=em.url, backoff_seconds=0.05)
    with pytest.raises(BadApiKey) as caught:
        await api.get_pod("p1")
    assert key not in str(caught.value) and key not in repr(api)
    assert asked(em, "rest:get") == 1
    api.close()


@pytest.mark.parametrize(
    ("status", "expected"),
    [(402, InsufficientBalance), (422, InvalidRequest), (403, BadApiKey)],
    ids=["402", "422", "403"],
)
async def test_create_errors_are_not_retried(em: EmulatorProcess, status: int, expected: type[Exception]) -> None:
    em.faults(replies=[{"field": "rest:create", "status": status}])
    api = client(em)
    with pytest.raises(expected):
        await api.create_pod(new_pod())
    assert asked(em, "rest:create") == 1
    api.close()


async def test_a_429_waits_retry_after_then_goes_on(em: EmulatorProcess) -> None:
    em.faults(replies=[{"field": "rest:get", "status": 429}])
    api = client(em)
    start = time.monotonic()
    assert await api.get_pod("unknown") is None
    assert time.monotonic() - start >= 0.9  # the fault's Retry-After: 1
    assert asked(em, "rest:get") == 2
    api.close()


async def test_the_rate_budget_follows_the_server(em: EmulatorProcess) -> None:
    em._post("rest/settings", {"quota_per_minute": 50})
    api = client(em)
    await api.list_pods()
    assert api.budget.remaining == 49
    assert client(em).budget is api.budget  # one budget per key for the process
    api.close()


async def test_gateway_pages_are_retried(em: EmulatorProcess) -> None:
    page = {"field": "rest:list", "status": 502, "body": "<html>Bad gateway</html>", "content_type": "text/html"}
    em.faults(replies=[{**page, "times": 2}])
    api = client(em)
    assert await api.list_pods() == []
    assert asked(em, "rest:list") == 3
    em.faults(replies=[{**page, "times": 5}])
    with pytest.raises(TransientError):
        await client(em, retries=1).list_pods()
    api.close()


async def test_a_create_answered_5xx_is_an_unknown_outcome(em: EmulatorProcess) -> None:
    em._post("rest/late-create", {"land_after_seconds": 0.2, "status": 504})
    api = client(em)
    request = new_pod()
    with pytest.raises(CreateOutcomeUnknown):
        await api.create_pod(request)
    assert asked(em, "rest:create") == 1  # never sent twice
    await asyncio.sleep(0.5)
    assert [p.name for p in await api.list_pods(request.name)] == [request.name]
    api.close()


async def test_a_create_without_a_reply_in_time_is_an_unknown_outcome(em: EmulatorProcess) -> None:
    em._post("rest/late-create", {"land_after_seconds": 0, "status": 201, "delay_seconds": 2})
    api = client(em, create_timeout_seconds=0.5)
    with pytest.raises(CreateOutcomeUnknown):
        await api.create_pod(new_pod())
    assert asked(em, "rest:create") == 1
    api.close()


async def test_a_read_without_a_reply_in_time_is_retried_then_transient(em: EmulatorProcess) -> None:
    em.faults(replies=[{"field": "rest:get", "delay_seconds": 1.5, "times": 5}])
    api = client(em, request_timeout_seconds=0.3, retries=1)
    with pytest.raises(TransientError):
        await api.get_pod("p1")
    assert asked(em, "rest:get") == 2
    api.close()


async def test_a_reply_too_large_is_not_read(em: EmulatorProcess) -> None:
    api = client(em, max_reply_bytes=200, retries=0)
    with pytest.raises(TransientError):
        await api.gpu_catalog()
    api.close()


async def test_pod_logs_as_lines(em: EmulatorProcess) -> None:
    api = client(em)
    pod = await api.create_pod(new_pod())
    em._post("rest/logs", {"pod_id": pod.id, "lines": ["one", "two", "three"]})
    assert await api.pod_logs(pod.id, tail=2) == ["two", "three"]
    with pytest.raises(PodNotFound):
        await api.pod_logs("unknown")
    api.close()


async def test_nothing_is_sent_while_the_budget_holds_too_long() -> None:
    api = RunPodRestClient(
        secrets.token_hex(8), base_url="http://127.0.0.1:1", max_wait_seconds=0.1, backoff_seconds=0.01
    )
    api.budget.hold(30)
    with pytest.raises(TransientError, match="rate limit"):
        await api.get_pod("p1")
    with pytest.raises(TransientError, match="rate limit"):
        await api.create_pod(new_pod())
    api.close()


async def test_a_create_that_could_not_connect_is_retried_as_not_sent() -> None:
    api = RunPodRestClient(secrets.token_hex(8), base_url="http://127.0.0.1:1", retries=1, backoff_seconds=0.01)
    with pytest.raises(TransientError) as caught:
        await api.create_pod(new_pod())
    assert not isinstance(caught.value, CreateOutcomeUnknown)
    api.close()


async def test_an_echoed_key_is_scrubbed_from_errors_and_logs(
    em: EmulatorProcess, caplog: pytest.LogCaptureFixture
) -> None:
    echo = json.dumps({"title": "Bad Request", "status": 400, "detail": f"key {em.api_key} is odd"})
    em.faults(replies=[{"field": "rest:get", "status": 400, "body": echo, "content_type": "application/problem+json"}])
    em.faults(replies=[{"field": "rest:list", "status": 503}])
    api = client(em)
    with caplog.at_level(logging.DEBUG), pytest.raises(ApiError) as caught:
        await api.get_pod("p1")
    assert em.api_key not in str(caught.value) and "***" in str(caught.value)
    with caplog.at_level(logging.DEBUG):
        await api.list_pods()
    assert "retry" in caplog.text and em.api_key not in caplog.text
    api.close()
