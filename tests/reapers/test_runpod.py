"""Pure parts of the RunPod reaper: its policy and its registration. (The RunPod profile settings and user options
are tested in tests/spawner/test_profiles.py and test_options.py, pod names in tests/core/engines/test_runpod.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from traitlets.config import Config

from dolab_core.engines.runpod import PodInfo
from dolab_services.reapers.registration import runpod_reaper_service
from dolab_services.reapers.runpod import find_pod_orphans
from tests.spawner.test_profiles import profile


def pod(pod_id: str, name: str) -> PodInfo:
    return PodInfo(pod_id, name, "RUNNING", 1.0, 1, "img")


def server(user: str, name: str = "", pod_id: str = "", pending: str | None = None, backend: str = "runpod") -> dict:
    state: dict[str, Any] = {"backend": backend, "backend_state": {"pod_id": pod_id} if pod_id else {}}
    return {"user": user, "name": name, "pending": pending, "state": state}


@pytest.mark.parametrize(
    ("pods", "servers", "orphans"),
    [
        pytest.param([pod("p1", "dolab-ann")], [server("ann", pod_id="p1")], [], id="owned by id"),
        pytest.param([pod("p1", "dolab-ann")], [], ["p1"], id="no server"),
        pytest.param([pod("p1", "other-ann")], [], [], id="another prefix: never touched"),
        pytest.param([pod("p2", "dolab-ann")], [server("ann", pod_id="p1")], ["p2"], id="a second pod of a server"),
        pytest.param([pod("p1", "dolab-ann")], [server("ann", pending="spawn")], [], id="starting: kept"),
        pytest.param([pod("p1", "dolab-ann")], [server("ann")], [], id="no pod id yet: kept for adoption"),
        pytest.param(
            [pod("p1", "dolab-ann")], [server("ann", backend="docker")], ["p1"], id="server moved to another backend"
        ),
        pytest.param(
            [pod("p1", "dolab-ann--big")], [server("ann", pod_id="p9")], ["p1"], id="named server that is gone"
        ),
        pytest.param([pod("p1", "dolab-ann--big")], [server("ann", "big", pod_id="p1")], [], id="named server owns it"),
    ],
)
def test_reaper_policy(pods: list[PodInfo], servers: list[dict], orphans: list[str]) -> None:
    assert [o.id for o in find_pod_orphans(pods, servers, "dolab-")] == orphans


def test_reaper_service_only_with_a_runpod_profile() -> None:
    config = Config()
    config.DoLabSpawner.profile_list = [{"display_name": "CPU"}]
    assert runpod_reaper_service(config, {}) is None
    config.DoLabSpawner.profile_list = [profile()]
    config.RunPodBackend.pod_name_prefix = "lab1-"
    env = {"RUNPOD_API_KEY": "rk", "DOLAB_RUNPOD_REAPER_TERMINATE": "1", "OTHER": "x", "DOLAB_HUB_ID": "test1234"}
    found = runpod_reaper_service(config, env, python="py")
    assert found is not None
    service, role = found.service, found.role
    command = ["py", "-m", "dolab_services.reapers", "runpod", "--interval", "600", "--prefix", "lab1-", "--terminate"]
    assert service["command"] == command
    assert service["environment"] == {"RUNPOD_API_KEY": "rk", "DOLAB_HUB_ID": "test1234"}
    assert "admin:server_state" in role["scopes"] and not any(s.startswith("admin:users") for s in role["scopes"])
    assert runpod_reaper_service(config, {**env, "DOLAB_RUNPOD_REAPER": "0"}) is None
