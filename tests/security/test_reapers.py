"""Attacks on the reapers' reach (issue 12, item 11): what another hub, or an admin by hand, made on a shared Docker
engine or RunPod account survives a reaper run that removes for real; only the hub's own leftovers go.

A real hub (the shipped config with a docker profile) makes its id and hands it to its reaper service; the Docker
sweep runs on the test stack's real engine 1, narrowed to this test's own containers (a label of its own) so that no
other test's container is ever in reach, whatever the reaper's policy. The RunPod reaper runs as its real service
process against a RunPod emulator of this module's own (records only), with the hub's id as the hub passes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docker
import docker.errors
import pytest

from dolab_core.engines.runpod import PodSpec, RunPodApi
from dolab_services.hubclient import HubClient
from dolab_services.reapers.docker import sweep
from dolab_spawner.backends.runpod import RunPodBackend
from tests.e2e.hub import REPO, Hub, free_port
from tests.e2e.stack import DockerStack, docker_stack
from tests.patience import patience
from tests.runpod_emulator.client import EmulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

A100 = "NVIDIA A100 80GB PCIe"
OTHER_HUB = "0therhub"  # the id of a second hub on the same engine and account


@pytest.fixture(scope="module")
def stack() -> DockerStack:
    return docker_stack()


@pytest.fixture(scope="module")
def hub(stack: DockerStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A real hub with a docker profile: it makes its id, and registers its (dry-run) reaper with it."""
    overlay = f"""
c.DoLabSpawner.profile_list = [{{"display_name": "Docker", "slug": "d", "backend": "docker"}}]
c.DoLabSpawner.docker_hosts = [{{"name": "local", "url": {stack.docker_host!r}}}]
c.DockerSpawner.image = {stack.image!r}
"""
    hub = Hub(tmp_path_factory.mktemp("security-reaper-hub"), overlay=overlay).start()
    try:
        yield hub
    finally:
        hub.shutdown()


def hub_id_of(hub: Hub) -> str:
    return (hub.data_dir / "hub-id").read_text().strip()


def test_the_hub_keeps_its_id_and_gives_it_to_its_reaper(hub: Hub) -> None:
    hub_id = hub_id_of(hub)
    assert len(hub_id) == 8 and hub_id.isalnum()
    # The hub's own dolab-reaper service (its output goes to the hub's log) sweeps with the id the hub keeps.
    deadline = time.monotonic() + patience(60)
    while f"Sweeping hub {hub_id}'s containers" not in hub.log_tail(400) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert f"Sweeping hub {hub_id}'s containers" in hub.log_tail(400)
    hub.restart()
    assert hub_id_of(hub) == hub_id, "the id must survive a restart"


@pytest.fixture
def engine(stack: DockerStack) -> Iterator[tuple[docker.DockerClient, str]]:
    """Engine 1 and a run label for this test's containers; they are removed afterwards, whatever happened."""
    client = docker.DockerClient(base_url=stack.docker_host, version="auto", timeout=30)
    run = uuid.uuid4().hex[:10]
    try:
        yield client, run
    finally:
        for made in client.containers.list(all=True, filters={"label": f"dolab.test.run={run}"}):
            made.remove(force=True)
        client.close()


def exists(client: docker.DockerClient, container_id: str) -> bool:
    try:
        client.containers.get(container_id)
        return True
    except docker.errors.NotFound:
        return False


async def test_another_hubs_and_hand_made_containers_survive_a_removing_sweep(
    hub: Hub, stack: DockerStack, engine: tuple[docker.DockerClient, str], caplog: pytest.LogCaptureFixture
) -> None:
    client, run = engine
    hub_id = hub_id_of(hub)

    def make(name: str, **labels: str) -> Any:
        labels = {**labels, "dolab.test": "1", "dolab.test.run": run}
        return client.containers.create(stack.image, ["sleep", "600"], name=f"{name}-{run}", labels=labels)

    server = {"dolab.managed": "true", "dolab.user": "ghost", "dolab.server": "", "dolab.host": "local"}
    ours = make(f"dolab-{hub_id}-ghost", **server, **{"dolab.hub": hub_id})  # this hub's leftover: goes
    other_hub = make(f"dolab-{OTHER_HUB}-ghost", **server, **{"dolab.hub": OTHER_HUB})  # a second hub's server
    hand_made = make("dolab-finetune", **{"dolab.managed": "true"})  # an admin's, copying the label
    before_ids = make("dolab-ghost", **server)  # from before hub ids: nobody can say whose it is
    caplog.set_level(logging.INFO, logger="dolab.reaper")
    async with HubClient(f"{hub.url}/hub/api", hub.token) as api:
        result = await sweep(
            api,
            [{"name": "local", "url": stack.docker_host}],
            hub_id=hub_id,
            remove=True,
            grace_seconds=0,
            label_filters=[f"dolab.test.run={run}"],
            log=logging.getLogger("dolab.reaper"),
        )
    assert [o.id for o in result.removed] == [ours.id]
    assert not exists(client, ours.id)
    for survivor in (other_hub, hand_made, before_ids):
        assert exists(client, survivor.id), f"{survivor.name} was removed by another hub's reaper"
    left_alone = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Leaving container")]
    assert sorted(m.split()[2] for m in left_alone) == sorted([hand_made.name, before_ids.name])


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """A RunPod account of this module's own (records only: its pods run nothing)."""
    log = tmp_path_factory.mktemp("reaper-runpod") / "emulator.log"
    em = EmulatorProcess(free_port(), secrets.token_hex(16), log, docker_host=None, instance="dolab-reaper-attack")
    try:
        yield em
    finally:
        em.stop()


async def test_another_hubs_and_hand_made_pods_survive_a_terminating_run(
    hub: Hub, emulator: EmulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator.reset()
    emulator.remove_all()
    hub_id = hub_id_of(hub)
    ours = RunPodBackend(user=SimpleNamespace(name="ghost"), hub_id=hub_id).pod_name
    assert ours == f"dolab-{hub_id}-ghost", "the hub names its pods with its id"
    names = [ours, "dolab-finetune", f"dolab-{OTHER_HUB}-ghost", "dolab-ghost"]
    monkeypatch.setenv("RUNPOD_API_BASE_URL", emulator.url)
    api = RunPodApi(emulator.api_key, retries=0)

    ids = {n: await api.create_pod(PodSpec(name=n, image="img", gpu_type_id=A100)) for n in names}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "DOLAB_", "RUNPOD_"))},
        "JUPYTERHUB_API_URL": f"{hub.url}/hub/api",
        "JUPYTERHUB_API_TOKEN": hub.token,
        "RUNPOD_API_KEY": emulator.api_key,
        "RUNPOD_API_BASE_URL": emulator.url,
        "DOLAB_HUB_ID": hub_id,  # as the hub hands it to its dolab-runpod-reaper service
    }
    command = [sys.executable, "-m", "dolab_services.reapers", "runpod", "--once", "--terminate"]
    command += ["--grace-seconds", "0"]
    done = await asyncio.to_thread(
        subprocess.run, command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    left = {p["name"] for p in emulator.pods()}
    assert ours not in left, f"the hub's own orphan is terminated:\n{done.stderr}"
    assert left == set(names) - {ours}, f"another hub's or a hand-made pod was terminated:\n{done.stderr}"
    assert ids[ours] in done.stderr and "Terminated orphan" in done.stderr


def test_a_reaper_without_the_hubs_id_refuses_to_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "DOLAB_", "RUNPOD_"))}
    env.update(
        JUPYTERHUB_API_URL="http://127.0.0.1:9/hub/api",
        JUPYTERHUB_API_TOKEN="t",
        RUNPOD_API_KEY="k",
        DOLAB_DATA_DIR=str(tmp_path / "never-a-hub-here"),
    )
    for reaper in ("docker", "runpod"):
        done = subprocess.run(
            [sys.executable, "-m", "dolab_services.reapers", reaper, "--once"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "This hub has no id yet" in done.stderr and "Traceback" not in done.stderr
