"""End to end: RunPod profiles on a real hub and proxy, the RunPod emulator, pods as containers on the real engine.

The hub talks to the emulator through the real runpod SDK (``RUNPOD_API_BASE_URL``); each pod's HTTP port is
published on 127.0.0.1 and reached with the proxy URL template ``http://{ip}:{public_port}``. The pod reaches the hub
API at the engine's bridge address (``hub_connect_url``), as a real pod reaches a hub's public https address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import requests

from dolab_core.engines.runpod import PodSpec, RunPodApi, hub_pod_prefix
from dolab_services.hubclient import HubClient
from dolab_services.reapers.runpod import sweep_pods
from tests.e2e.hub import Hub, free_port
from tests.e2e.jupyter import run_in_kernel
from tests.e2e.stack import DockerStack, docker_stack
from tests.patience import patience
from tests.runpod_emulator.client import PROXY_URL_TEMPLATE, EmulatorProcess
from tests.runpod_emulator.server import LABEL

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

A100 = "NVIDIA A100 80GB PCIe"
H100 = "NVIDIA H100 80GB HBM3"
LEAK_CANARY = "dolab-canary-secret-5c2e"


def runpod_profile(slug: str, **overrides: Any) -> dict[str, Any]:
    runpod = {
        "gpu_types": [A100, H100],
        "cloud_type": "secure",
        "image": "dolab-singleuser-test:latest",
        "container_disk_gb": 20,
        "max_price_per_hour": 5,
    }
    runpod.update(overrides.pop("runpod", {}))
    profile = {"display_name": f"RunPod {slug}", "slug": slug, "backend": "runpod", "gpus": 1, "runpod": runpod}
    return {**profile, **overrides}


@pytest.fixture(scope="module")
def stack() -> DockerStack:
    return docker_stack()


@pytest.fixture(scope="module")
def hub(stack: DockerStack, emulator: EmulatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("runpod-hub")
    hook_dir = root / "hooks"
    hook_dir.mkdir()
    hub_port = free_port()
    profiles = [
        {"display_name": "CPU", "slug": "cpu", "default": True},
        runpod_profile("pod"),
        # A short start timeout, to see a start given up by the hub end with no pod.
        runpod_profile("quick", spawner_override={"pod_start_timeout_seconds": 6}),
        # Another account key (the hub's is right): RunPod refuses it.
        runpod_profile("badkey", spawner_override={"api_key": "not-the-key"}),
        # Stopping keeps the pod's disk; the next start resumes the pod.
        runpod_profile("keep", spawner_override={"stop_action": "stop"}),
    ]
    overlay = f"""
c.DoLabSpawner.profile_list = {profiles!r}
c.RunPodBackend.hub_connect_url = "http://{stack.bridge_ip}:{hub_port}"
c.RunPodBackend.proxy_url_template = {PROXY_URL_TEMPLATE!r}
c.RunPodBackend.poll_interval_seconds = 0.2
c.RunPodBackend.poll_max_interval_seconds = 1
c.RunPodBackend.api_backoff_seconds = 0.1
c.RunPodBackend.api_retries = 2
c.RunPodBackend.price_ttl_seconds = 0

import json, os, urllib.request

def _backup_hook(spawner, reason):
    # Stands for the sync service's final backup: records what the pod was doing then, fails when told to.
    pod_id = spawner.get_state().get("backend_state", {{}}).get("pod_id", "")
    with urllib.request.urlopen({emulator.url + "/_emulator/pods"!r}, timeout=10) as reply:
        pods = json.load(reply)["pods"]
    status = next((p["desiredStatus"] for p in pods if p["id"] == pod_id), "gone")
    with open(os.path.join({str(hook_dir)!r}, "calls.jsonl"), "a") as out:
        out.write(json.dumps({{"user": spawner.user.name, "pod": pod_id, "status": status}}) + "\\n")
    if os.path.exists(os.path.join({str(hook_dir)!r}, "fail-" + spawner.user.name)):
        raise RuntimeError("The backup to the test store failed.")

c.DoLabSpawner.pre_destroy_hooks = [_backup_hook]
"""
    env = {
        "DOLAB_HUB_IP": "0.0.0.0",
        "DOLAB_HUB_PORT": str(hub_port),
        "RUNPOD_API_BASE_URL": emulator.url,
        "RUNPOD_API_KEY": emulator.api_key,
        "AWS_SECRET_ACCESS_KEY": LEAK_CANARY,
        # Its sweeps would be requests of their own; the reaper's test runs a sweep itself.
        "DOLAB_RUNPOD_REAPER": "0",
    }
    hub = Hub(root, overlay=overlay, env=env).start()
    yield hub
    hub.shutdown()


@pytest.fixture
def em(emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    emulator.reset()
    yield emulator
    emulator.reset()


def engine_containers(stack: DockerStack, emulator: EmulatorProcess) -> list[Any]:
    client = docker.DockerClient(base_url=stack.docker_host, timeout=30)
    return client.containers.list(all=True, filters={"label": f"{LABEL}={emulator.instance}"})


def wait_gone(hub: Hub, user: str, timeout: float = 60) -> None:
    """Wait until the hub no longer lists the user's server (a failed spawn ends like that)."""
    deadline = time.monotonic() + patience(timeout)
    while time.monotonic() < deadline:
        if "" not in hub.user(user).get("servers", {}):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{user}'s server still listed:\n{hub.log_tail()}")


def failed_start(hub: Hub, user: str, options: dict[str, Any]) -> str:
    """Start, expect a failure, return its message (from the reply, else from the progress stream)."""
    hub.create_user(user)
    reply = hub.start_server(user, options)
    if reply.status_code >= 400:
        wait_gone(hub, user)
        return str(reply.json()["message"])
    assert reply.status_code == 202, reply.text
    events = hub.progress_events(user, timeout=120)
    wait_gone(hub, user)
    assert events and events[-1].get("failed"), events
    return str(events[-1]["message"])


def no_pod_left(em: EmulatorProcess, stack: DockerStack) -> None:
    assert em.pods() == []
    assert engine_containers(stack, em) == []


def test_a_user_works_in_a_pod_through_the_proxy_then_stop_terminates_it(
    hub: Hub, em: EmulatorProcess, stack: DockerStack
) -> None:
    hub.create_user("rita")
    reply = hub.start_server("rita", {"profile": "pod"})
    assert reply.status_code in (201, 202), reply.text
    events = hub.progress_events("rita", timeout=120) if reply.status_code == 202 else []
    server = hub.wait_ready("rita", timeout=120)
    state = server["state"]
    (pod,) = em.pods()
    assert state["backend"] == "runpod" and state["backend_state"]["pod_id"] == pod["id"]
    # What the monitor reads: A100 on the secure cloud, one GPU.
    assert state["price_per_hour_usd"] == pytest.approx(1.64)
    assert (state["gpu_type"], state["gpu_count"]) == (A100, 1)
    assert state["slots"] == []
    hub_id = (hub.data_dir / "hub-id").read_text().strip()  # the hub's id is in every pod name it makes
    assert pod["name"] == f"dolab-{hub_id}-rita" and pod["cloud"] == "SECURE" and pod["gpuCount"] == 1
    messages = [e["message"] for e in events]
    if events:
        assert any("Requesting A100 PCIe on secure cloud" in m for m in messages), messages
        assert "Pod scheduled, pulling image" in messages

    # The pod has the hub's variables, its own token, and nothing else of the hub's environment.
    env = pod["env"]
    assert env["JUPYTERHUB_API_URL"] == f"http://{stack.bridge_ip}:{hub.env['DOLAB_HUB_PORT']}/hub/api"
    assert env["JUPYTERHUB_API_TOKEN"] and env["JUPYTERHUB_USER"] == "rita"
    assert not any(em.api_key in v or LEAK_CANARY in v for v in env.values())
    assert "PATH" not in env and "CUDA_VISIBLE_DEVICES" not in env
    assert pod["dockerArgs"] == "jupyterhub-singleuser"

    token = hub.user_token("rita")
    api = requests.get(f"{hub.url}/user/rita/api", headers={"Authorization": f"token {token}"}, timeout=30)
    assert api.status_code == 200 and "version" in api.json()
    assert run_in_kernel(hub.url, "rita", token, "print(6 * 7)").strip() == "42"
    # The key never reaches the browser: the form shows prices, not secrets.
    form = hub.api("GET", "/users/rita").json()
    assert em.api_key not in str(form)

    hub.stop_server("rita")
    no_pod_left(em, stack)
    assert em.api_key not in hub.log_path.read_text(errors="replace")  # the hub logs at DEBUG level here


def test_no_capacity_falls_back_to_the_next_gpu_type(hub: Hub, em: EmulatorProcess, stack: DockerStack) -> None:
    em.faults(no_capacity=[[A100, "SECURE"]])
    hub.create_user("fred")
    reply = hub.start_server("fred", {"profile": "pod"})
    assert reply.status_code in (201, 202), reply.text
    events = hub.progress_events("fred", timeout=120) if reply.status_code == 202 else []
    state = hub.wait_ready("fred", timeout=120)["state"]
    (pod,) = em.pods()
    assert pod["machine"]["gpuDisplayName"] == H100
    assert state["backend_state"]["gpu_type_id"] == H100
    assert state["price_per_hour_usd"] == pytest.approx(2.99)
    if events:
        assert any(
            "No capacity for A100 PCIe on secure cloud, trying H100 SXM on secure cloud" in e["message"] for e in events
        )
    creates = [r for r in em.requests() if r["fields"] == ["podFindAndDeployOnDemand"]]
    assert [A100 in r["query"] for r in creates] == [True, False]
    hub.stop_server("fred")
    no_pod_left(em, stack)


def test_a_hub_restart_keeps_the_pod(hub: Hub, em: EmulatorProcess, stack: DockerStack) -> None:
    hub.create_user("hana")
    assert hub.start_server("hana", {"profile": "pod"}).status_code in (201, 202)
    hub.wait_ready("hana", timeout=120)
    (before,) = em.pods()
    hub.restart()
    server = hub.wait_ready("hana", timeout=60)
    (after,) = em.pods()
    assert after["id"] == before["id"] == server["state"]["backend_state"]["pod_id"]
    assert after["containerId"] == before["containerId"] and after["boots"] == 1
    token = hub.user_token("hana")
    assert requests.get(f"{hub.url}/user/hana/api", headers={"Authorization": f"token {token}"}, timeout=30).ok
    hub.stop_server("hana")
    no_pod_left(em, stack)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"profile": "pod", "max_price_per_hour": 9.5}, "You can pay at most $5 per hour"),
        ({"profile": "pod", "gpu_type": "NVIDIA Tesla V100"}, "is not a GPU type of profile 'pod'"),
        ({"profile": "pod", "max_price_per_hour": "lots"}, "max_price_per_hour must be a number"),
    ],
    ids=["price above the maximum", "unknown GPU type", "price not a number"],
)
def test_bad_user_options_are_refused_before_any_runpod_call(
    hub: Hub, em: EmulatorProcess, options: dict[str, Any], expected: str
) -> None:
    hub.create_user("bart")
    reply = hub.start_server("bart", options)
    assert reply.status_code == 400, reply.text
    assert expected in reply.json()["message"]
    assert em.requests() == []


@pytest.mark.parametrize(
    ("profile", "faults", "expected"),
    [
        pytest.param(
            "pod",
            {"no_capacity": [[A100, "SECURE"], [H100, "SECURE"]]},
            "no capacity for this profile right now. Tried: A100 PCIe on secure cloud, H100 SXM on secure cloud",
            id="no capacity anywhere",
        ),
        pytest.param(
            "pod",
            {
                "replies": [
                    {
                        "field": "podFindAndDeployOnDemand",
                        "times": 10,
                        "status": 429,
                        "body": "<html>Too Many Requests</html>",
                        "content_type": "text/html",
                    }
                ]
            },
            "RunPod is not answering properly right now",
            id="429 with an HTML page",
        ),
        pytest.param(
            "pod",
            {
                "replies": [
                    {
                        "field": "podFindAndDeployOnDemand",
                        "times": 10,
                        "status": 502,
                        "body": "bad gateway",
                        "content_type": "text/plain",
                    }
                ]
            },
            "RunPod is not answering properly right now",
            id="502 not JSON",
        ),
        pytest.param(
            "pod",
            {
                "replies": [
                    {
                        "field": "gpuTypes",
                        "times": 10,
                        "status": 500,
                        "body": '{"errors": [{"message": "Something went wrong. Please try again later."}]}',
                    }
                ]
            },
            "RunPod is not answering properly right now",
            id="500 with a JSON error",
        ),
        pytest.param("badkey", {}, "the hub's RunPod account was refused", id="bad API key"),
        pytest.param("quick", {"boot_seconds": 60}, "", id="boot slower than the start timeout"),
        pytest.param(
            "quick",
            {"boot_seconds": 1, "replies": [{"field": "pod", "times": 1000, "status": 503, "body": "unavailable"}]},
            "",
            id="polls fail until the start timeout",
        ),
    ],
)
def test_each_failure_ends_with_no_pod_left(
    hub: Hub, em: EmulatorProcess, stack: DockerStack, profile: str, faults: dict[str, Any], expected: str
) -> None:
    em.faults(**faults)
    message = failed_start(hub, "fay", {"profile": profile})
    assert expected in message, message
    em.reset()  # the polls' faults must not hide the pods from the check
    no_pod_left(em, stack)


def test_a_pod_that_vanishes_while_starting_fails_the_start(hub: Hub, em: EmulatorProcess, stack: DockerStack) -> None:
    em.faults(boot_seconds=20)  # still booting when the POST returns (after the hub's 10 s slow-spawn wait)
    hub.create_user("vera")
    reply = hub.start_server("vera", {"profile": "pod"})
    deadline = time.monotonic() + patience(30)
    while not em.pods() and time.monotonic() < deadline:
        time.sleep(0.1)
    (pod,) = em.pods()
    em.vanish(pod["id"])
    if reply.status_code == 202:
        events = hub.progress_events("vera", timeout=60)
        assert "disappeared while starting" in events[-1]["message"]
    wait_gone(hub, "vera")
    no_pod_left(em, stack)


def test_a_pod_that_vanishes_while_running_is_seen_as_stopped(
    hub: Hub, em: EmulatorProcess, stack: DockerStack
) -> None:
    hub.create_user("otto")
    assert hub.start_server("otto", {"profile": "pod"}).status_code in (201, 202)
    hub.wait_ready("otto", timeout=120)
    (pod,) = em.pods()
    em.vanish(pod["id"])
    # The hub polls before a stop: the server is found stopped and forgotten, and stopping it again is harmless.
    hub.stop_server("otto")
    no_pod_left(em, stack)


async def test_the_reaper_reports_then_terminates_pods_no_server_owns(
    hub: Hub, em: EmulatorProcess, stack: DockerStack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hub.create_user("rose")
    assert hub.start_server("rose", {"profile": "pod"}).status_code in (201, 202)
    await asyncio.to_thread(hub.wait_ready, "rose", "", 120)
    (owned,) = em.pods()
    monkeypatch.setenv("RUNPOD_API_BASE_URL", em.url)
    api = RunPodApi(em.api_key, retries=0)
    strays = {}
    # The hub's own prefix, as its dolab-runpod-reaper service gets it (pod_name_prefix and the hub's id).
    prefix = hub_pod_prefix("dolab-", (hub.data_dir / "hub-id").read_text().strip())
    # A pod no server has; a second pod with rose's name (a leftover of an earlier start); another hub's pod.
    # And a stopped pod no server has: its disk may hold unsynced work, so it is only ever reported.
    names = {"dolab-ghost": f"{prefix}ghost", "dolab-rose": f"{prefix}rose", "someone-else": "someone-else"}
    names["dolab-stopped"] = f"{prefix}stopped"
    for key, name in names.items():
        strays[key] = await api.create_pod(
            PodSpec(name=name, image="dolab-singleuser-test:latest", gpu_type_id=A100, docker_args="sleep 600")
        )
    await api.stop_pod(strays["dolab-stopped"])
    caplog.set_level(logging.INFO)
    async with HubClient(api_url=f"{hub.url}/hub/api", token=hub.token) as client:
        dry = await sweep_pods(client, api, prefix, grace_seconds=0)
        assert sorted((o.name, o.id) for o in dry.orphans) == sorted(
            [(names["dolab-ghost"], strays["dolab-ghost"]), (names["dolab-rose"], strays["dolab-rose"])]
        )
        assert dry.terminated == [] and len(em.pods()) == 5
        assert [o.id for o in dry.stopped] == [strays["dolab-stopped"]]
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Orphan pod")]
        assert len(lines) == 2 and all("Dry run" in line for line in lines)
        assert any(f"server rose runs pod {owned['id']}" in line for line in lines), lines
        done = await sweep_pods(client, api, prefix, terminate=True, grace_seconds=0)
    assert sorted(o.id for o in done.terminated) == sorted([strays["dolab-ghost"], strays["dolab-rose"]])
    kept = [owned["id"], strays["someone-else"], strays["dolab-stopped"]]
    assert sorted(p["id"] for p in em.pods()) == sorted(kept)
    await api.terminate_pod(strays["someone-else"])
    await api.terminate_pod(strays["dolab-stopped"])
    await asyncio.to_thread(hub.stop_server, "rose")
    no_pod_left(em, stack)


def test_a_stop_that_keeps_the_disk_and_a_start_that_resumes_the_pod(
    hub: Hub, em: EmulatorProcess, stack: DockerStack
) -> None:
    hub.create_user("kim")
    try:
        assert hub.start_server("kim", {"profile": "keep"}).status_code in (201, 202)
        hub.wait_ready("kim", timeout=120)
        (pod,) = em.pods()
        hub.stop_server("kim")
        (stopped,) = em.pods()
        assert (stopped["id"], stopped["desiredStatus"], stopped["containerRunning"]) == (pod["id"], "EXITED", False)

        assert hub.start_server("kim", {"profile": "keep"}).status_code in (201, 202)
        server = hub.wait_ready("kim", timeout=120)
        (resumed,) = em.pods()
        assert resumed["id"] == pod["id"] == server["state"]["backend_state"]["pod_id"]
        assert resumed["boots"] == 2 and resumed["containerId"] == pod["containerId"]  # the same disk
        token = hub.user_token("kim")
        assert run_in_kernel(hub.url, "kim", token, "print('back')").strip() == "back"
        hub.stop_server("kim")
        assert [p["desiredStatus"] for p in em.pods()] == ["EXITED"]
    finally:
        em.remove_all()
    no_pod_left(em, stack)


def hook_calls(hub: Hub, user: str) -> list[dict[str, Any]]:
    path = hub.root / "hooks" / "calls.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [call for call in map(json.loads, lines) if call["user"] == user]


def test_stop_backs_up_first_then_terminates_and_a_failed_backup_keeps_the_disk(
    hub: Hub, em: EmulatorProcess, stack: DockerStack
) -> None:
    hub.create_user("sara")
    assert hub.start_server("sara", {"profile": "pod"}).status_code in (201, 202)
    hub.wait_ready("sara", timeout=120)
    (pod,) = em.pods()
    hub.stop_server("sara")
    assert hook_calls(hub, "sara") == [{"user": "sara", "pod": pod["id"], "status": "RUNNING"}]  # backup first
    no_pod_left(em, stack)  # then terminated

    hub.create_user("sami")
    (hub.root / "hooks" / "fail-sami").touch()
    try:
        assert hub.start_server("sami", {"profile": "pod"}).status_code in (201, 202)
        hub.wait_ready("sami", timeout=120)
        (pod,) = em.pods()
        hub.stop_server("sami")
        assert hook_calls(hub, "sami") == [{"user": "sami", "pod": pod["id"], "status": "RUNNING"}]
        (kept,) = em.pods()
        assert (kept["id"], kept["desiredStatus"], kept["containerRunning"]) == (pod["id"], "EXITED", False)
        assert "The backup to the test store failed." in hub.log_tail(200)
    finally:
        (hub.root / "hooks" / "fail-sami").unlink()
        em.remove_all()
    no_pod_left(em, stack)
