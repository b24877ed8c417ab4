"""The RunPod adapter (dolab_core.engines.runpod) against the emulator (records only, no engine needed): escaping,
errors, retries, prices; and its pure parts (pod names, GPU prices per cloud, a pod's ports)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator

import pytest
import requests
import runpod.error

from dolab_core.engines.runpod import (
    ApiError,
    BadApiKey,
    GpuType,
    NoCapacity,
    PodInfo,
    PodSpec,
    RunPodApi,
    TransientError,
    UnknownGpuType,
    classify,
    escape,
    pod_name,
)
from tests.runpod_emulator.client import EmulatorProcess
from tests.runpod_emulator.schema import GENERIC, NO_CAPACITY, NO_GPUS_ON_HOST

A100 = "NVIDIA A100 80GB PCIe"


@pytest.fixture
def em(record_emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    old = os.environ.get("RUNPOD_API_BASE_URL")
    os.environ["RUNPOD_API_BASE_URL"] = record_emulator.url
    record_emulator.reset()
    yield record_emulator
    record_emulator.remove_all()
    record_emulator.reset()
    if old is None:
        os.environ.pop("RUNPOD_API_BASE_URL", None)
    else:
        os.environ["RUNPOD_API_BASE_URL"] = old


def adapter(em: EmulatorProcess, **settings: float) -> RunPodApi:
    options = {"retries": 2, "backoff_seconds": 0.05, "call_timeout_seconds": 10.0, **settings}
    return RunPodApi(em.api_key, **options)  # type: ignore[arg-type]


NASTY = [
    pytest.param('say "hi"', id="double quotes"),
    pytest.param("back\\slash\\", id="backslashes"),
    pytest.param("two\nlines\r\ttab", id="control characters"),
    pytest.param('x", imageName: "evil/image', id="an attempt to add a field"),
    pytest.param('"} ) { id } } mutation { podTerminate(input: {podId: "x"}) #', id="an attempt to add an operation"),
    pytest.param("Grüße, 東京 ✓", id="unicode"),
]


@pytest.mark.parametrize("value", NASTY)
def test_escape_round_trips_through_a_graphql_string(value: str) -> None:
    import graphql

    document = graphql.parse(f'{{ f(a: "{escape(value)}") }}')
    argument = document.definitions[0].selection_set.selections[0].arguments[0]  # type: ignore[attr-defined]
    assert argument.value.value == value


@pytest.mark.parametrize("value", NASTY)
async def test_every_string_reaches_runpod_exactly_as_given(em: EmulatorProcess, value: str) -> None:
    api = adapter(em)
    spec = PodSpec(
        name=f"dolab-{value}",
        image="dolab-singleuser-test:latest",
        gpu_type_id=A100,
        env={"VALUE": value, "JUPYTERHUB_USER": value},
        docker_args=f"jupyterhub-singleuser --note={value}",
        volume_mount_path=f"/work/{value}",
    )
    pod_id = await api.create_pod(spec)
    (pod,) = em.pods()
    assert pod["id"] == pod_id
    assert pod["name"] == spec.name and pod["imageName"] == spec.image
    assert pod["env"] == {"VALUE": value, "JUPYTERHUB_USER": value}
    assert pod["dockerArgs"] == spec.docker_args and pod["volumeMountPath"] == spec.volume_mount_path
    found = await api.get_pod(pod_id)
    assert found is not None and found.name == spec.name
    assert [p.id for p in await api.list_pods("dolab-")] == [pod_id]
    await api.terminate_pod(pod_id)
    assert await api.get_pod(pod_id) is None


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (runpod.error.AuthenticationError("No API key provided"), BadApiKey),
        (runpod.error.AuthenticationError("Unauthorized request, please check your API key."), BadApiKey),
        (runpod.error.QueryError(NO_CAPACITY), NoCapacity),
        (runpod.error.QueryError(NO_GPUS_ON_HOST), NoCapacity),
        (runpod.error.QueryError(GENERIC), TransientError),
        (runpod.error.QueryError("Too Many Requests"), TransientError),
        (runpod.error.QueryError("Pod name is invalid"), ApiError),
        (requests.exceptions.JSONDecodeError("Expecting value", "<html>", 0), TransientError),
        (requests.exceptions.ConnectionError("refused"), TransientError),
        (requests.exceptions.Timeout("read timed out"), TransientError),
        (asyncio.TimeoutError(), TransientError),
        (ValueError("No GPU found with the specified ID, run runpod.get_gpus() to get a list"), UnknownGpuType),
        (KeyError("data"), TransientError),
        (RuntimeError("surprise"), ApiError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.__name__,
)
def test_classify(error: Exception, kind: type) -> None:
    assert type(classify(error)) is kind


async def test_rate_limits_and_gateway_pages_are_retried_with_backoff(em: EmulatorProcess) -> None:
    api = adapter(em)
    em.faults(
        replies=[
            {"field": "pod", "status": 429, "body": "<html>Too Many Requests</html>", "content_type": "text/html"},
            {"field": "pod", "status": 502, "body": "Bad Gateway", "content_type": "text/plain"},
        ]
    )
    assert await api.get_pod("unknown") is None
    assert [r["status"] for r in em.requests()] == [429, 502, 200]


async def test_retries_end_in_a_clean_transient_error(em: EmulatorProcess) -> None:
    api = adapter(em)
    em.faults(replies=[{"field": "myself", "times": 10, "status": 500, "body": '{"errors": [{"message": "boom"}]}'}])
    with pytest.raises(ApiError):  # a JSON error that is not known to be transient: not retried
        await api.list_pods()
    em.reset()
    em.faults(replies=[{"field": "myself", "times": 10, "status": 503, "body": "unavailable"}])
    with pytest.raises(TransientError):
        await api.list_pods()
    assert len(em.requests()) == 3  # one try and two retries


async def test_a_call_that_hangs_times_out(em: EmulatorProcess) -> None:
    api = adapter(em, call_timeout_seconds=0.5, retries=0)
    em.faults(replies=[{"field": "gpuTypes", "delay_seconds": 3}])
    with pytest.raises(TransientError, match="no reply in time"):
        await api.gpu_type(A100)


async def test_a_create_whose_reply_was_lost_adopts_the_pod_instead_of_making_a_second(em: EmulatorProcess) -> None:
    # The create is answered (and done) after the adapter gave up waiting; the retry finds the pod by its name.
    api = adapter(em, call_timeout_seconds=0.8, backoff_seconds=1.5, retries=1)
    em.faults(replies=[{"field": "podFindAndDeployOnDemand", "delay_seconds": 1.2}])
    pod_id = await api.create_pod(PodSpec(name="dolab-lost", image="img", gpu_type_id=A100))
    assert [p["id"] for p in em.pods()] == [pod_id]


async def test_no_capacity_and_unknown_gpu_types_are_not_retried(em: EmulatorProcess) -> None:
    api = adapter(em)
    em.faults(no_capacity=[[A100, "SECURE"]])
    with pytest.raises(NoCapacity):
        await api.create_pod(PodSpec(name="dolab-full", image="img", gpu_type_id=A100, cloud_type="SECURE"))
    with pytest.raises(UnknownGpuType):
        await api.gpu_type("NVIDIA Tesla V100")
    assert em.fields_asked() == ["gpuTypes", "podFindAndDeployOnDemand", "gpuTypes"]
    assert em.pods() == []


async def test_a_wrong_key_is_never_logged(em: EmulatorProcess, caplog: pytest.LogCaptureFixture) -> None:
    secret = "rk-wrong-0123456789"
    api = RunPodApi(secret, retries=0)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BadApiKey) as raised:
        await api.list_pods()
    assert secret not in caplog.text and secret not in str(raised.value) and secret not in repr(api)


async def test_prices_are_cached_for_their_time_to_live(em: EmulatorProcess) -> None:
    api = adapter(em, price_ttl_seconds=300)
    first = await api.gpu_type(A100)
    assert (first.secure_price, first.community_price) == (1.64, 1.19)
    assert first.price("ALL") == 1.19
    em.prices({A100: {"securePrice": 2.0}})
    assert (await api.gpu_type(A100)).secure_price == 1.64  # cached
    assert em.fields_asked() == ["gpuTypes"]
    fresh = adapter(em, price_ttl_seconds=0)
    assert (await fresh.gpu_type(A100)).secure_price == 2.0


async def test_stop_resume_and_terminate_twice(em: EmulatorProcess) -> None:
    api = adapter(em)
    pod_id = await api.create_pod(PodSpec(name="dolab-life", image="img", gpu_type_id=A100))
    await api.stop_pod(pod_id)
    stopped = await api.get_pod(pod_id)
    assert stopped is not None and stopped.desired_status == "EXITED" and stopped.port(8888) is None
    em.faults(resume_fails=True)
    with pytest.raises(NoCapacity):
        await api.resume_pod(pod_id, 1)
    em.faults(resume_fails=False)
    await api.resume_pod(pod_id, 1)
    await api.terminate_pod(pod_id)
    await api.terminate_pod(pod_id)  # already gone: fine
    assert await api.get_pod(pod_id) is None


@pytest.mark.parametrize(
    ("user", "server", "name"),
    [
        ("ann", "", "dolab-ann"),
        ("ann", "big", "dolab-ann--big"),
        ("Ann.Lee@x.org", "", "dolab--41nn-2E-4Cee-40x-2Eorg"),
        ("a-b", "", "dolab-a-2Db"),
    ],
)
def test_pod_names_are_deterministic_and_unambiguous(user: str, server: str, name: str) -> None:
    assert pod_name("dolab-", user, server) == name


def test_gpu_type_prices_per_cloud() -> None:
    gpu = GpuType("x", "X", 80, secure_price=2.0, community_price=1.5)
    assert (gpu.price("SECURE"), gpu.price("COMMUNITY"), gpu.price("ALL")) == (2.0, 1.5, 1.5)
    assert GpuType("y", "Y", 80, None, None).price("ALL") is None


def test_runtime_ports_count_only_while_running() -> None:
    raw = {
        "id": "p1",
        "desiredStatus": "EXITED",
        "runtime": {"ports": [{"ip": "1.2.3.4", "privatePort": 8888, "publicPort": 8888, "type": "http"}]},
    }
    assert PodInfo.from_api(raw).port(8888) is None  # stale runtime of a stopped pod
    running = PodInfo.from_api({**raw, "desiredStatus": "RUNNING"})
    assert running.port(8888) is not None and running.port(22) is None
    assert PodInfo.from_api({**raw, "desiredStatus": "RUNNING", "runtime": None}).port(8888) is None
