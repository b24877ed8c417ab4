"""Pure parts of the RunPod backend: profile settings, user_options, pod names, the reaper's policy, the form."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from bs4 import BeautifulSoup, Tag
from traitlets.config import Config

from dolab_core.engines.runpod import GpuType, PodInfo, pod_name
from dolab_services.reapers.registration import runpod_reaper_service
from dolab_services.reapers.runpod import find_pod_orphans
from dolab_spawner import DoLabSpawner
from dolab_spawner.backends.runpod_offers import pod_request
from dolab_spawner.options import OptionsError, resolve_options
from dolab_spawner.profiles import ProfileConfigError, parse_profile_list
from tests.runpod_emulator.client import EmulatorProcess

A100 = "NVIDIA A100 80GB PCIe"
H100 = "NVIDIA H100 80GB HBM3"
BACKENDS = ("local", "docker", "runpod")


def profile(**runpod: Any) -> dict[str, Any]:
    settings = {"gpu_types": [A100, H100], "image": "me/lab:1", "max_price_per_hour": 4, **runpod}
    return {"display_name": "Pod", "slug": "pod", "backend": "runpod", "gpus": 2, "runpod": settings}


def test_a_runpod_profile_is_parsed_with_its_defaults() -> None:
    (p,) = parse_profile_list([profile()], backends=BACKENDS)
    assert p.runpod is not None
    assert p.runpod.gpu_types == (A100, H100) and p.runpod.cloud_type == "secure"
    assert (p.runpod.container_disk_gb, p.runpod.volume_gb, p.runpod.volume_mount_path) == (20, 0, "/workspace")
    assert p.allowed_keys[-2:] == ["gpu_type", "max_price_per_hour"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (profile(gpu_types=[]), "gpu_types must be a list"),
        (profile(gpu_types=[A100, A100]), "each once"),
        (profile(cloud_type="cheap"), "cloud_type must be one of secure, community, all"),
        (profile(image=""), "image must be a non-empty string"),
        (profile(max_price_per_hour=-1), "max_price_per_hour must be a number of at least 0"),
        (profile(container_disk_gb=2.5), "whole numbers"),
        (profile(volume_mount_path="data"), "absolute path"),
        (profile(region="eu"), "unknown key(s) 'region'"),
        ({**profile(), "gpus": 0}, "needs gpus"),
        ({**profile(), "gpu_type": "A100"}, "not in gpu_type"),
        ({"display_name": "CPU", "runpod": {"gpu_types": [A100]}}, "only for backend: runpod"),
        ({"display_name": "Pod", "backend": "runpod", "gpus": 1}, "must be a dict with gpu_types and image"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_runpod_settings_are_refused_with_a_sentence(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_profile_list([entry], backends=BACKENDS)


def test_user_options_pick_the_first_gpu_type_and_a_lower_price() -> None:
    profiles = parse_profile_list([profile()], backends=BACKENDS)
    plain = resolve_options(profiles, {"profile": "pod"})
    assert plain.gpu_types == (A100, H100) and plain.price_cap_per_hour == 4
    picked = resolve_options(profiles, {"profile": "pod", "gpu_type": H100, "max_price_per_hour": "3.5", "gpus": 1})
    assert picked.gpu_types == (H100, A100) and picked.price_cap_per_hour == 3.5
    stored = picked.user_options()
    assert stored == {"profile": "pod", "gpus": 1, "gpu_type": H100, "max_price_per_hour": 3.5}
    assert resolve_options(profiles, stored).user_options() == stored
    request = pod_request(picked)
    assert request["gpu_types"] == [H100, A100] and request["gpu_count"] == 1 and request["max_price_per_hour"] == 3.5
    assert request["image"] == "me/lab:1" and request["cloud_type"] == "secure"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gpu_type": "NVIDIA Tesla V100"}, "is not a GPU type of profile 'pod'"),
        ({"gpu_type": 3}, "is not a GPU type"),
        ({"max_price_per_hour": 4.01}, "at most $4 per hour"),
        ({"max_price_per_hour": 0}, "above 0"),
        ({"max_price_per_hour": "nan"}, "above 0"),
        ({"max_price_per_hour": True}, "above 0"),
        ({"gpus": 3}, "at most 2 GPU"),
    ],
)
def test_bad_user_options_are_refused(options: dict[str, Any], message: str) -> None:
    profiles = parse_profile_list([profile()], backends=BACKENDS)
    with pytest.raises(OptionsError, match=message.replace("$", r"\$")):
        resolve_options(profiles, {"profile": "pod", **options})


def test_other_profiles_take_no_runpod_options() -> None:
    profiles = parse_profile_list([{"display_name": "CPU", "slug": "cpu"}], backends=BACKENDS)
    with pytest.raises(OptionsError, match="Unknown option"):
        resolve_options(profiles, {"profile": "cpu", "gpu_type": A100})


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


@pytest.fixture
def prices_from(record_emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    old = os.environ.get("RUNPOD_API_BASE_URL")
    os.environ["RUNPOD_API_BASE_URL"] = record_emulator.url
    record_emulator.reset()
    yield record_emulator
    if old is None:
        os.environ.pop("RUNPOD_API_BASE_URL", None)
    else:
        os.environ["RUNPOD_API_BASE_URL"] = old


async def test_the_form_shows_live_prices_and_never_the_key(prices_from: EmulatorProcess) -> None:
    config = Config()
    config.DoLabSpawner.profile_list = [{"display_name": "CPU", "slug": "cpu"}, profile(cloud_type="community")]
    config.DoLabSpawner.gpu_inventory = []
    config.RunPodBackend.api_key = prices_from.api_key
    prices_from.prices({H100: {"communityPrice": 2.5}})
    html = await DoLabSpawner(config=config).render_options_form()
    assert prices_from.api_key not in html
    card = BeautifulSoup(html, "html.parser").find("div", attrs={"data-profile": "pod"})
    assert isinstance(card, Tag)
    select = card.find("select", attrs={"name": "gpu_type-pod"})
    assert isinstance(select, Tag)
    options = {str(o["value"]): (str(o["data-price-per-hour"]), o.get_text(" ", strip=True)) for o in select("option")}
    # Prices per pod-hour: two GPUs at the community price.
    assert options[A100][0] == "2.38" and "$2.38 per hour for 2 GPUs" in options[A100][1]
    assert options[H100][0] == "5.0"
    assert "community cloud" in card.get_text() and "at most $4.00 per hour" in card.get_text()
    form = {"profile": ["pod"], "gpu_type-pod": [H100], "gpus-pod": ["1"], "stop_mode": ["none"]}
    options_posted = await DoLabSpawner(config=config).options_from_form(form)
    assert options_posted == {"profile": "pod", "gpus": 1, "gpu_type": H100}
