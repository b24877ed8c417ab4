"""ServerState: the one reader and writer of a server's spawner state (dolab_core.serverstate).

A round trip through the stored form, a state an older DO-LAB wrote, junk values read as absent, and the attack a
contract in the hub's state exists for: a user writes ``user_options`` (the spawn form, the REST API), so a stop
time there must never outlive the one the spawner validated.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from dolab_core.serverstate import STATE_VERSION, ServerState
from dolab_services.culler.facts import server_facts
from dolab_services.culler.policy import CullPolicy, decide
from dolab_services.monitor.runs import GpuPrices, server_runs

SLOT = {"index": 0, "uuid": "GPU-aaaa", "name": "NVIDIA A100 80GB PCIe", "memory_gb": 80.0, "host": "local"}
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)


def test_round_trip() -> None:
    state = ServerState(
        profile="gpu-a100",
        backend="docker",
        host="gpu2",
        slots=({**SLOT, "host": "gpu2"},),
        stop_at="2030-01-31T18:00:00Z",
        backend_state={"object_id": "c0ffee", "object_name": "dolab-ana", "docker_host": "gpu2"},
        workspace="/srv/dolab/users/ana",
        server_url="http://127.0.0.1:51234/user/ana/",
        kept_reason="The backup failed.",
        kept_at="2030-01-31T18:00:01Z",
    )
    stored = state.to_dict()
    assert stored["version"] == STATE_VERSION
    assert ServerState.read(stored) == state
    assert ServerState.of({"state": stored}) == state
    assert state.stop_time == datetime(2030, 1, 31, 18, tzinfo=timezone.utc)
    assert state.container == ("gpu2", "c0ffee", "dolab-ana")
    assert state.pod_id == ""


def test_round_trip_of_a_rented_machine() -> None:
    state = ServerState(
        profile="rtx",
        backend="runpod",
        host="runpod",
        backend_state={"pod_id": "pod-1", "gpu_type_id": "NVIDIA GeForce RTX 4090", "gpu_count": 2},
        price_per_hour_usd=1.38,
        gpu_type="NVIDIA GeForce RTX 4090",
        gpu_count=2,
    )
    assert ServerState.read(state.to_dict()) == state
    assert state.pod_id == "pod-1"


def test_an_empty_state_is_a_server_dolab_has_not_started() -> None:
    assert ServerState().to_dict() == {}
    assert ServerState.read({}).backend == "" and ServerState.read({}).stop_time is None
    assert ServerState.of({"name": "", "ready": True}) == ServerState(version=0), "no admin:server_state: no state"


def test_a_version_0_state_reads() -> None:
    """Wave 1 wrote no ``version``, and older RunPod states had the pod's figures only in ``backend_state``."""
    old = {
        "profile": "rtx",
        "backend": "runpod",
        "host": "runpod",
        "slots": [],
        "stop_at": "2030-01-01T18:00:00Z",
        "backend_state": {
            "pod_id": "pod-7",
            "gpu_type_id": "NVIDIA GeForce RTX 4090",
            "gpu_count": 3,
            "price_per_hour_usd": 2.07,
            "gpu_utilization_percent": 55,
        },
    }
    state = ServerState.read(old)
    assert state.version == 0
    assert (state.gpu_type, state.gpu_count, state.price_per_hour_usd) == ("NVIDIA GeForce RTX 4090", 3, 2.07)
    assert state.gpu_utilization_percent == 55.0
    assert state.pod_id == "pod-7" and state.stop_time == datetime(2030, 1, 1, 18, tzinfo=timezone.utc)
    assert ServerState.read(state.to_dict()).version == STATE_VERSION, "written back as this release's version"
    users = [{"name": "ana", "servers": {"": {"started": "2030-01-01T10:00:00Z", "state": old}}}]
    [run] = server_runs(users, GpuPrices())
    assert (dict(run.gpus), run.usd_per_hour) == ({"NVIDIA GeForce RTX 4090": 3}, 2.07)


JUNK: list[Any] = [None, 7, True, "text", ["a"], {"nested": 1}, float("nan"), float("inf"), -3]


@pytest.mark.parametrize("junk", JUNK, ids=[repr(j) for j in JUNK])
def test_junk_values_read_as_absent(junk: Any) -> None:
    keys = (
        "profile",
        "backend",
        "host",
        "slots",
        "stop_at",
        "backend_state",
        "workspace",
        "server_url",
        "price_per_hour_usd",
        "gpu_count",
        "gpu_utilization_percent",
        "kept",
        "version",
    )
    state = ServerState.read(dict.fromkeys(keys, junk))
    for text in ("profile", "backend", "stop_at", "workspace", "server_url"):
        assert getattr(state, text) == (junk if isinstance(junk, str) else ""), text
    assert state.host == (junk if isinstance(junk, str) else "local")
    assert state.slots == () and dict(state.backend_state) == (junk if isinstance(junk, dict) else {})
    assert state.price_per_hour_usd in (None, -3.0, 7.0) and state.gpu_utilization_percent in (None, -3.0, 7.0)
    assert state.gpu_count in (0, 7)
    assert state.stop_time is None, "junk is no stop time"
    assert state.kept_reason == "" and state.version in (0, 7, -3)
    assert state.pod_id == "" and state.container == (state.host, "", "")


@pytest.mark.parametrize("raw", [None, "state", 3, ["profile"]], ids=["none", "text", "number", "list"])
def test_a_state_that_is_not_an_object_reads_as_empty(raw: Any) -> None:
    assert ServerState.read(raw) == ServerState(version=0)
    assert ServerState.of({"state": raw}) == ServerState(version=0)
    assert ServerState.of(raw) == ServerState(version=0)


def test_slot_entries_that_are_not_objects_are_left_out() -> None:
    state = ServerState.read({"backend": "local", "slots": [SLOT, "GPU-bbbb", 3, None]})
    assert state.slots == (SLOT,)


def _server(options: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    started = (NOW - timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    active = NOW.isoformat().replace("+00:00", "Z")  # in use just now: only a stop time can stop it
    return {"started": started, "last_activity": active, "ready": True, "user_options": options, "state": state}


def test_attack_a_stop_time_in_user_options_does_not_outlive_the_states() -> None:
    """Mallory's spawner validated a stop time one minute ago; she writes a later one into user_options (and
    another profile, for a cheaper plan rule). The culler stops her server at the state's time, as her profile."""
    state = {
        "version": 1,
        "profile": "a100",
        "backend": "local",
        "slots": [SLOT],
        "stop_at": (NOW - timedelta(minutes=1)).isoformat().replace("+00:00", "Z"),
    }
    options = {"profile": "cpu", "stop_at": "2099-01-01T00:00:00Z"}
    facts = server_facts({"name": "mallory"}, "", _server(options, state), NOW)
    assert facts.stop_at == NOW - timedelta(minutes=1)
    assert (facts.profile, facts.gpus) == ("a100", 1)
    decision = decide(facts, CullPolicy(), NOW)
    assert (decision.action, decision.reason) == ("stop", "deadline")


def test_attack_a_stop_time_only_in_user_options_is_ignored() -> None:
    """A stop time the spawner never validated (no stop time in the state) is not one: the state's absence wins."""
    options = {"profile": "a100", "stop_at": (NOW - timedelta(hours=1)).isoformat()}
    facts = server_facts({"name": "mallory"}, "", _server(options, {"backend": "local", "profile": "cpu"}), NOW)
    assert facts.stop_at is None and facts.profile == "cpu"
    [run] = server_runs([{"name": "mallory", "servers": {"": _server(options, {"backend": "local"})}}], GpuPrices())
    assert run.profile == ""
