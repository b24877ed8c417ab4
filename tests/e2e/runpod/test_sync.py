"""End to end: RunPod servers backed up and restored through their own REST API (real hub and proxy, the RunPod
emulator running pods as containers on the real engine, moto_server as the S3 store, the shipped sync hooks).

- stopping a pod's server backs its workspace up through the contents API, then terminates the pod;
- a failed backup (the store is down) stops the pod keeping its disk, and says why in the server's state;
- a new pod starts with its workspace restored from the backup, with progress events.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from dolab_services.sync.config import user_prefix
from dolab_services.sync.contents import RemoteServer
from dolab_services.sync.engine import SyncEngine
from tests.e2e.hub import REPO, Hub, free_port
from tests.e2e.stack import DockerStack, docker_stack
from tests.runpod_emulator.client import PROXY_URL_TEMPLATE, EmulatorProcess
from tests.sync.conftest import CREDENTIALS, S3Server, s3_server  # noqa: F401 (the session fixture)

from .test_backend import runpod_profile

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

PREFIX = "pod-backups"
#: Above the restore's 8 MiB upload chunk: it goes back into the new pod in two chunks.
BIG = 9 * (1 << 20) + 12345


@pytest.fixture(scope="module")
def stack() -> DockerStack:
    return docker_stack()


@pytest.fixture(scope="module")
def sync_bucket(s3_server: S3Server) -> str:  # noqa: F811
    return s3_server.new_bucket()


@pytest.fixture(scope="module")
def hub(
    stack: DockerStack,
    emulator: EmulatorProcess,
    s3_server: S3Server,  # noqa: F811
    sync_bucket: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("runpod-sync-hub")
    hub_port = free_port()
    profiles = [{"display_name": "CPU", "slug": "cpu", "default": True}, runpod_profile("pod")]
    overlay = f"""
c.DoLabSpawner.profile_list = {profiles!r}
c.RunPodBackend.hub_connect_url = "http://{stack.bridge_ip}:{hub_port}"
c.RunPodBackend.proxy_url_template = {PROXY_URL_TEMPLATE!r}
c.RunPodBackend.poll_interval_seconds = 0.2
c.RunPodBackend.poll_max_interval_seconds = 1
c.RunPodBackend.api_backoff_seconds = 0.1
c.RunPodBackend.price_ttl_seconds = 0
"""
    env = {
        "DOLAB_HUB_IP": "0.0.0.0",
        "DOLAB_HUB_PORT": str(hub_port),
        "RUNPOD_API_BASE_URL": emulator.url,
        "RUNPOD_API_KEY": emulator.api_key,
        "DOLAB_RUNPOD_REAPER": "0",
        "DOLAB_SYNC_S3_BUCKET": sync_bucket,
        "DOLAB_SYNC_S3_ENDPOINT": s3_server.endpoint_url,
        "DOLAB_SYNC_S3_REGION": CREDENTIALS["region_name"],
        "DOLAB_SYNC_S3_PREFIX": PREFIX,
        "DOLAB_SYNC_S3_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "DOLAB_SYNC_S3_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
        # No periodic round: every snapshot here comes from a stop.
        "DOLAB_SYNC_INTERVAL_MINUTES": "0",
        "DOLAB_SYNC_PORT": str(free_port()),
        "PYTHONPATH": str(REPO),
    }
    hub = Hub(root, overlay=overlay, env=env).start()
    yield hub
    hub.shutdown()


@pytest.fixture
def em(emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    emulator.reset()
    yield emulator
    emulator.reset()


def engine_for(s3_server: S3Server, bucket: str, user: str) -> SyncEngine:  # noqa: F811
    return SyncEngine(s3_server.store(bucket, f"{PREFIX}/{user_prefix(user)}"))


def start_pod(hub: Hub, user: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    hub.create_user(user)
    reply = hub.start_server(user, {"profile": "pod"})
    assert reply.status_code in (201, 202), reply.text
    events = hub.progress_events(user, timeout=180) if reply.status_code == 202 else []
    return hub.wait_ready(user, timeout=180), events


def through_proxy(hub: Hub, user: str) -> RemoteServer:
    """The user's own view of their server (through the hub's proxy, with their token)."""
    return RemoteServer(f"{hub.url}/user/{user}/", hub.user_token(user))


def put_file(server: RemoteServer, path: str, data: bytes) -> None:
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        server.upload(path, f.fileno(), len(data))


def big_content() -> bytes:
    return (hashlib.sha256(b"seed").digest() * (BIG // 32 + 1))[:BIG]


def read_file(hub: Hub, user: str, path: str) -> bytes:
    reply = requests.get(
        f"{hub.url}/user/{user}/files/{path}", headers={"Authorization": f"token {hub.user_token(user)}"}, timeout=60
    )
    assert reply.status_code == 200, (path, reply.status_code)
    return reply.content


def test_stop_backs_up_through_the_api_then_terminates_and_a_new_pod_gets_it_back(
    hub: Hub,
    em: EmulatorProcess,
    s3_server: S3Server,  # noqa: F811
    sync_bucket: str,
) -> None:
    server, _ = start_pod(hub, "sara")
    (pod,) = em.pods()
    assert server["state"]["backend_state"]["pod_id"] == pod["id"]
    assert not any(CREDENTIALS["secret_access_key"] in v for v in pod["env"].values())
    user_view = through_proxy(hub, "sara")
    user_view.make_dir("work")
    user_view.make_dir("données")
    put_file(user_view, "work/notes.md", b"# written in the pod\n")
    put_file(user_view, "données/été ✓.txt", "unicode ✓".encode())
    put_file(user_view, "work/weights.bin", big_content())

    hub.stop_server("sara", timeout=180)

    assert em.pods() == []  # terminated: nothing bills any more
    manifest = engine_for(s3_server, sync_bucket, "sara").manifest()
    files = {f.path: f for f in manifest.files}
    assert {"work/notes.md", "données/été ✓.txt", "work/weights.bin"} <= set(files)
    assert files["work/weights.bin"].sha256 == hashlib.sha256(big_content()).hexdigest()
    assert "Final sync of sara's remote workspace before stopping" in hub.log_tail(3000)

    # A new pod: an empty workspace, filled from that backup once its server answers.
    _, events = start_pod(hub, "sara")
    (new_pod,) = em.pods()
    assert new_pod["id"] != pod["id"]
    messages = [e["message"] for e in events] or hub.log_tail(3000).splitlines()
    assert any("Restored 3 files from your backup of " + manifest.snapshot in m for m in messages), messages
    assert read_file(hub, "sara", "work/notes.md") == b"# written in the pod\n"
    assert read_file(hub, "sara", "données/été ✓.txt") == "unicode ✓".encode()
    assert read_file(hub, "sara", "work/weights.bin") == big_content()

    hub.stop_server("sara", timeout=180)
    assert em.pods() == []
    # The restore filled the hub's cache: the second stop downloaded nothing, and its snapshot (the restored files
    # have new times) holds the same contents.
    [*_, done] = [line for line in hub.log_tail(3000).splitlines() if "Final sync of sara done" in line]
    assert "0 files downloaded, 0 uploaded" in done
    latest = engine_for(s3_server, sync_bucket, "sara").manifest()
    assert {f.path: f.sha256 for f in latest.files} == {f.path: f.sha256 for f in manifest.files}


def _empty_and_delete(s3_server: S3Server, bucket: str) -> None:  # noqa: F811
    client = s3_server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    client.delete_bucket(Bucket=bucket)


def test_a_failed_backup_keeps_the_pod_stopped_with_its_disk(
    hub: Hub,
    em: EmulatorProcess,
    s3_server: S3Server,  # noqa: F811
    sync_bucket: str,
) -> None:
    start_pod(hub, "ulla")
    put_file(through_proxy(hub, "ulla"), "thesis.md", b"only copy")
    (pod,) = em.pods()
    _empty_and_delete(s3_server, sync_bucket)  # the store fails: its bucket is gone
    try:
        hub.stop_server("ulla", timeout=180)
    finally:
        s3_server.client().create_bucket(Bucket=sync_bucket)

    (kept,) = em.pods()
    assert kept["id"] == pod["id"]
    assert kept["desiredStatus"] == "EXITED"  # stopped, disk kept: not terminated
    stopped = hub.api("GET", "/users/ulla?include_stopped_servers=1").json()["servers"][""]
    reason = stopped["state"]["kept"]["reason"]
    assert reason.startswith("The backup of your workspace before the stop failed (")
    assert "stopped with its disk kept" in reason
    assert "storage kept" in hub.log_tail(1000)

    # Starting again resumes that pod, with the file still on its disk; a stop that can back up terminates it.
    start_pod(hub, "ulla")
    (resumed,) = em.pods()
    assert resumed["id"] == pod["id"]
    assert read_file(hub, "ulla", "thesis.md") == b"only copy"
    hub.stop_server("ulla", timeout=180)
    assert em.pods() == []
    assert "thesis.md" in {f.path for f in engine_for(s3_server, sync_bucket, "ulla").manifest().files}
