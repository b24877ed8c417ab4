"""Workspace backups end to end: a real hub (the shipped config with DOLAB_SYNC_* set), real proxy, the dolab-sync
service it manages, docker servers on the real test engine, and moto_server as the S3 store.

- stopping a server backs its workspace up first, then removes the container (in that order);
- a failed final backup keeps the container (stopped, not removed) and says why in the server's state;
- the service API: a user lists and restores their own backups, never another's;
- a new, empty workspace is filled from the latest backup at spawn, with progress events;
- the periodic backup picks up a running server's work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from dolab_services.sync.config import user_prefix
from dolab_services.sync.engine import SyncEngine
from dolab_spawner.cli import main as dolab
from tests.e2e.hub import REPO, Hub, free_port
from tests.e2e.jupyter import run_in_kernel
from tests.e2e.stack import DockerStack, docker_stack
from tests.patience import patience
from tests.sync.conftest import CREDENTIALS, S3Server
from tests.sync.treeutil import write

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

PREFIX = "team-backups"


@pytest.fixture(scope="module")
def stack() -> DockerStack:
    return docker_stack()


@pytest.fixture(scope="module")
def sync_bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@pytest.fixture(scope="module")
def hub(
    stack: DockerStack, s3_server: S3Server, sync_bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("sync-hub")
    hub_port = free_port()
    profiles = [{"display_name": "Docker CPU", "slug": "dcpu", "backend": "docker", "default": True}]
    overlay = f"""
c.DoLabSpawner.profile_list = {profiles!r}
c.DoLabSpawner.docker_hosts = {[{"name": "local", "url": stack.docker_host}]!r}
c.DockerSpawner.image = {stack.image!r}
c.DockerSpawner.extra_create_kwargs = {{"labels": {{"dolab.test": "1"}}}}
c.DoLabSpawner.pre_destroy_hooks.append("tests.sync.order_probe:record")
"""
    env = {
        "DOLAB_HUB_IP": "0.0.0.0",
        "DOLAB_HUB_PORT": str(hub_port),
        "DOLAB_SYNC_S3_BUCKET": sync_bucket,
        "DOLAB_SYNC_S3_ENDPOINT": s3_server.endpoint_url,
        "DOLAB_SYNC_S3_REGION": CREDENTIALS["region_name"],
        "DOLAB_SYNC_S3_PREFIX": PREFIX,
        "DOLAB_SYNC_S3_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "DOLAB_SYNC_S3_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
        "DOLAB_SYNC_INTERVAL_MINUTES": "0.05",
        "DOLAB_SYNC_PORT": str(free_port()),
        "DOLAB_TEST_PROBE_FILE": str(root / "probe.jsonl"),
        "DOLAB_TEST_DOCKER_HOST": stack.docker_host,
        "PYTHONPATH": str(REPO),
    }
    hub = Hub(root, overlay=overlay, env=env).start()
    yield hub
    hub.shutdown()
    client = docker.DockerClient(base_url=stack.docker_host)
    for container in client.containers.list(all=True, filters={"label": "dolab.test=1"}):
        container.remove(force=True)


def probes(hub: Hub, user: str) -> list[dict[str, Any]]:
    path = Path(hub.env["DOLAB_TEST_PROBE_FILE"])
    lines = path.read_text().splitlines() if path.exists() else []
    return [p for p in map(json.loads, lines) if p["user"] == user]


def start(hub: Hub, user: str) -> dict[str, Any]:
    hub.create_user(user)
    reply = hub.start_server(user, {"profile": "dcpu"})
    assert reply.status_code in (201, 202), reply.text
    return hub.wait_ready(user)


def in_container(hub: Hub, user: str, code: str) -> str:
    return run_in_kernel(hub.url, user, hub.user_token(user), code)


def engine_for(s3_server: S3Server, bucket: str, user: str) -> SyncEngine:
    return SyncEngine(s3_server.store(bucket, f"{PREFIX}/{user_prefix(user)}"))


def api(hub: Hub, token: str, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(
        method,
        f"{hub.url}/services/dolab-sync/api/{path}",
        headers={"Authorization": f"token {token}"},
        timeout=120,
        **kwargs,
    )


def test_stop_backs_up_then_removes_the_container(hub: Hub, stack: DockerStack, s3_server: S3Server, sync_bucket: str):
    server = start(hub, "alice")
    container_id = server["state"]["backend_state"]["object_id"]
    workspace = Path(server["state"]["workspace"])
    in_container(hub, "alice", "open('thesis.md', 'w').write('written in the container')")

    hub.stop_server("alice")

    [probe] = probes(hub, "alice")
    assert probe["container_running"] is True, "the container was gone before the backup was done"
    assert probe["snapshots"], "no snapshot existed when the container was about to be removed"
    with pytest.raises(docker.errors.NotFound):
        docker.APIClient(base_url=stack.docker_host).inspect_container(container_id)
    manifest = engine_for(s3_server, sync_bucket, "alice").manifest(probe["snapshots"][-1])
    assert "thesis.md" in {f.path for f in manifest.files}
    assert (workspace / "thesis.md").read_text() == "written in the container"


def test_a_failed_final_backup_keeps_the_container(
    hub: Hub, stack: DockerStack, s3_server: S3Server, sync_bucket: str
) -> None:
    server = start(hub, "bob")
    container_id = server["state"]["backend_state"]["object_id"]
    _empty_and_delete(s3_server, sync_bucket)  # the store fails: its bucket is gone
    try:
        hub.stop_server("bob")
    finally:
        s3_server.client().create_bucket(Bucket=sync_bucket)

    info = docker.APIClient(base_url=stack.docker_host).inspect_container(container_id)
    assert info["State"]["Running"] is False  # stopped, not removed
    assert probes(hub, "bob") == []  # the hooks after the failed one did not run
    stopped = hub.api("GET", "/users/bob?include_stopped_servers=1").json()["servers"][""]
    assert "does not exist" in stopped["state"]["kept"]["reason"]
    assert "storage kept" in hub.log_tail(400)


def test_users_see_and_restore_only_their_own_backups(hub: Hub, s3_server: S3Server, sync_bucket: str) -> None:
    server = start(hub, "carol")
    workspace = Path(server["state"]["workspace"])
    write(workspace, "notes/keep.txt", "carol's notes")
    hub.create_user("dave-other")
    carol, dave = hub.user_token("carol"), hub.user_token("dave-other")

    made = api(hub, carol, "POST", "backup", json={})
    assert made.status_code == 200, made.text
    snapshot = made.json()["snapshot"] or made.json()["previous"]
    listed = api(hub, carol, "GET", "backups").json()
    assert snapshot in [s["id"] for s in listed["snapshots"]]
    assert listed["target"].endswith(f"/{PREFIX}/carol")

    # Another user: refused whatever way they name carol, and their own list is empty.
    assert api(hub, dave, "GET", "backups?user=carol").status_code == 403
    assert api(hub, dave, "GET", f"backups/{snapshot}?user=carol").status_code == 403
    assert api(hub, dave, "POST", "restore", json={"user": "carol"}).status_code == 403
    assert api(hub, dave, "GET", f"backups/{snapshot}").status_code == 404
    assert api(hub, dave, "GET", "backups").json()["snapshots"] == []
    assert api(hub, "not-a-token", "GET", "backups").status_code == 403

    # Carol deletes a file and gets it back; paths that leave the workspace are refused.
    (workspace / "notes" / "keep.txt").unlink()
    restored = api(hub, carol, "POST", "restore", json={"snapshot": snapshot, "paths": ["notes/keep.txt"]})
    assert restored.status_code == 200, restored.text
    assert (workspace / "notes" / "keep.txt").read_text() == "carol's notes"
    for bad in ({"paths": ["../alice/thesis.md"]}, {"paths": ["/etc/passwd"]}, {"into": "../elsewhere"}):
        reply = api(hub, carol, "POST", "restore", json=bad)
        assert reply.status_code == 400, reply.text
    hub.stop_server("carol")


def test_a_new_workspace_is_restored_at_spawn(hub: Hub, s3_server: S3Server, sync_bucket: str, tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    write(seed, "project/train.py", "print('restored')")
    engine_for(s3_server, sync_bucket, "erin").backup(seed)
    hub.create_user("erin")
    assert hub.start_server("erin", {"profile": "dcpu"}).status_code in (201, 202)

    hub.wait_ready("erin")

    # The spawn page's progress events (DoLabSpawner.emit logs each one; the spawn is over before a reader could
    # attach to the event stream).
    assert "Restored 1 files from your backup" in hub.log_tail(2000)
    assert in_container(hub, "erin", "print(open('project/train.py').read())").strip() == "print('restored')"
    hub.stop_server("erin")


def test_running_servers_are_backed_up_periodically(hub: Hub, s3_server: S3Server, sync_bucket: str) -> None:
    start(hub, "frank")
    in_container(hub, "frank", "open('live.txt', 'w').write('periodic')")
    engine = engine_for(s3_server, sync_bucket, "frank")
    deadline = time.monotonic() + patience(120)
    while not (engine.snapshots() and "live.txt" in {f.path for f in engine.manifest().files}):
        assert time.monotonic() < deadline, f"no periodic backup of frank:\n{hub.log_tail()}"
        time.sleep(1)
    hub.stop_server("frank")


def test_no_storage_secret_reaches_a_users_server(hub: Hub) -> None:
    start(hub, "gina")
    env = json.loads(in_container(hub, "gina", "import json, os; print(json.dumps(dict(os.environ)))"))
    assert not [k for k in env if k.startswith("DOLAB_SYNC") or k.startswith("AWS_")]
    assert CREDENTIALS["secret_access_key"] not in json.dumps(env)
    hub.stop_server("gina")


def test_the_dolab_cli_lists_and_restores(hub: Hub, capsys: pytest.CaptureFixture[str]) -> None:
    server = start(hub, "hana")
    workspace = Path(server["state"]["workspace"])
    write(workspace, "report.txt", "v1")
    token = hub.user_token("hana")
    cli = ["backups", "--url", hub.url, "--token", token]

    assert dolab([*cli, "now"]) == 0
    assert "Backed up: restore point" in capsys.readouterr().out
    assert dolab([*cli, "list", "--json"]) == 0
    [snapshot] = [s["id"] for s in json.loads(capsys.readouterr().out)["snapshots"]]
    (workspace / "report.txt").unlink()
    assert dolab([*cli, "restore", "--snapshot", snapshot, "--into", "recovered", "report.txt"]) == 0
    assert "Restored 1 files" in capsys.readouterr().out
    assert (workspace / "recovered" / "report.txt").read_text() == "v1"
    # Another user's backups: the service's sentence, exit code 2.
    assert dolab([*cli, "--user", "alice", "list"]) == 2
    assert "only see and restore your own backups" in capsys.readouterr().err
    hub.stop_server("hana")


def _empty_and_delete(s3_server: S3Server, bucket: str) -> None:
    s3 = s3_server.client()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", ()):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)


def test_the_culler_backs_up_before_it_stops(hub: Hub, s3_server: S3Server, sync_bucket: str) -> None:
    hub.create_user("admin")
    admin = hub.user_token("admin")

    def culler_stop(user: str) -> requests.Response:
        return requests.post(
            f"{hub.url}/services/dolab-culler/api/stop",
            json={"user": user, "server": ""},
            headers={"Authorization": f"token {admin}"},
            timeout=120,
        )

    server = start(hub, "ivan")
    write(Path(server["state"]["workspace"]), "before-cull.txt", "saved by the culler's hook")
    reply = culler_stop("ivan")
    assert reply.status_code == 200, reply.text
    files = {f.path for f in engine_for(s3_server, sync_bucket, "ivan").manifest().files}
    assert "before-cull.txt" in files
    assert "Backed up ivan before the admin stop" in hub.log_tail(3000)

    # The backup fails: the culler does not stop the server.
    start(hub, "judy")
    _empty_and_delete(s3_server, sync_bucket)
    try:
        blocked = culler_stop("judy")
    finally:
        s3_server.client().create_bucket(Bucket=sync_bucket)
    assert blocked.status_code == 409, blocked.text
    assert hub.user("judy")["servers"][""]["ready"]
    hub.stop_server("judy")
