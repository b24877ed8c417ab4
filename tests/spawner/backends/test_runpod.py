"""RunPodBackend (dolab_spawner.backends.runpod) against the emulator (records only, no engine needed): poll, stop and
suspend as a restarted hub uses them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from dolab_core.engines.runpod import PodSpec
from dolab_spawner.backends.runpod import RunPodBackend
from tests.core.engines.test_runpod import A100, adapter
from tests.runpod_emulator.client import EmulatorProcess


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


def backend_for(em: EmulatorProcess, user: str, **traits: Any) -> RunPodBackend:
    """A RunPodBackend outside a hub (what a restarted hub rebuilds), on the emulator."""
    traits.setdefault("hub_id", "test1234")  # the hub's id (dolab_core.hubidentity) in every pod name
    return RunPodBackend(user=SimpleNamespace(name=user), api_key=em.api_key, api_backoff_seconds=0.05, **traits)


async def test_a_server_without_a_pod_id_finds_its_pod_by_name_and_polls_and_stops_it(em: EmulatorProcess) -> None:
    api = adapter(em)
    pod_id = await api.create_pod(PodSpec(name="dolab-test1234-nora", image="img", gpu_type_id=A100))
    await api.create_pod(PodSpec(name="dolab-test1234-nora--other", image="img", gpu_type_id=A100))
    await api.create_pod(PodSpec(name="dolab-nora", image="img", gpu_type_id=A100))  # another hub's, or from before
    # hub ids: never adopted by name
    backend = backend_for(em, "nora")
    assert await backend.poll() is None
    assert backend.pod_id == pod_id and backend.get_state()["pod_id"] == pod_id
    await backend.stop()
    assert await api.get_pod(pod_id) is None
    assert await backend.poll() == 0
    await backend.stop()  # again: nothing left to do
    assert sorted(p["name"] for p in em.pods()) == ["dolab-nora", "dolab-test1234-nora--other"]


async def test_poll_maps_exited_and_missing_pods_to_stopped(em: EmulatorProcess) -> None:
    api = adapter(em)
    pod_id = await api.create_pod(PodSpec(name="dolab-olga", image="img", gpu_type_id=A100))
    backend = backend_for(em, "olga")
    backend.load_state({"pod_id": pod_id, "gpu_type_id": A100, "gpu_count": 1, "price_per_hour_usd": 1.64})
    assert await backend.poll() is None
    em.faults(replies=[{"field": "pod", "times": 10, "status": 502, "body": "gateway", "content_type": "text/plain"}])
    assert await backend.poll() is None  # RunPod cannot say: the pod is not forgotten
    em.reset()
    await backend.suspend()
    assert (await api.get_pod(pod_id)).desired_status == "EXITED"  # type: ignore[union-attr]
    assert await backend.poll() == 0
    await backend.suspend()  # already stopped: fine
    em.vanish(pod_id)
    assert await backend.poll() == 0
    assert backend.monitor_state() == {"price_per_hour_usd": 1.64, "gpu_type": A100, "gpu_count": 1}
