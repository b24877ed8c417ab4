"""The sync hooks for remote servers, in the hub's process: a real jupyter-server stands for the pod's server, a
real S3 server (moto_server) for the target. The spawner is a stand-in holding what DoLabSpawner gives the hooks
(the pod on the RunPod emulator is the e2e test's part: tests/e2e/runpod/test_sync.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dolab_services.servertokens import ServerTokens
from dolab_services.sync import hooks
from dolab_services.sync.backups import Backups
from dolab_services.sync.config import SyncSettings
from dolab_services.sync.engine import SyncEngine
from dolab_services.sync.registration import sync_service
from dolab_services.sync.remote_hooks import backup_remote_server, sweep_remote
from dolab_services.sync.store import StoreError

from .conftest import CREDENTIALS, S3Server
from .test_remote import BASE_URL, JupyterServer, contents, jupyter  # noqa: F401 (the fixture)
from .treeutil import write


@pytest.fixture
def sync_env(s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The hub's DOLAB_SYNC_* environment for an S3 target on the test server."""
    env = {
        "DOLAB_SYNC_S3_BUCKET": bucket,
        "DOLAB_SYNC_S3_ENDPOINT": s3_server.endpoint_url,
        "DOLAB_SYNC_S3_REGION": CREDENTIALS["region_name"],
        "DOLAB_SYNC_S3_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "DOLAB_SYNC_S3_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
        "DOLAB_DATA_DIR": str(tmp_path / "data"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def engine_of(env: dict[str, str], user: str = "alice") -> SyncEngine:
    return SyncEngine(SyncSettings.from_env(env).store_for(user))


class FakeServer:
    def __init__(self, url: str) -> None:
        self.url = url
        self.port = int(url.split(":")[2].split("/")[0])
        self.base_url = BASE_URL


def remote_spawner(server: JupyterServer | None, token: str | None = None) -> Any:
    """What the hooks read from a DoLabSpawner whose server runs in a RunPod pod."""
    events: list[tuple[int, str]] = []
    return SimpleNamespace(
        user=SimpleNamespace(name="alice", get_auth_state=None),
        backend_name="runpod",
        host_workspace=lambda: "",
        server=FakeServer(server.url) if server is not None else None,
        api_token=token if token is not None else (server.token if server is not None else ""),
        log=logging.getLogger("test.spawner"),
        emit=lambda progress, message: events.append((progress, message)),
        events=events,
        server_ready_hooks=[],
    )


async def test_final_sync_backs_a_remote_server_up_through_its_api(jupyter, sync_env: dict[str, str]) -> None:  # noqa: F811
    server = jupyter()
    write(server.root, "work/train.py", "print('hi')\n")
    write(server.root, "données/été.txt", "✓")

    await hooks.final_sync(remote_spawner(server), "stop")

    manifest = engine_of(sync_env).manifest()
    assert [f.path for f in manifest.files] == ["données/été.txt", "work/train.py"]


@pytest.mark.parametrize("failure", ["server-gone", "wrong-token", "store-down"])
async def test_a_failed_final_sync_raises_a_sentence(
    jupyter,  # noqa: F811
    sync_env: dict[str, str],
    failure: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = jupyter()
    write(server.root, "a.txt", "a")
    spawner = remote_spawner(server, token="not-its-token" if failure == "wrong-token" else None)
    if failure == "server-gone":
        server.proc.terminate()
        server.proc.wait(10)
    if failure == "store-down":
        monkeypatch.setenv("DOLAB_SYNC_S3_ENDPOINT", "http://127.0.0.1:9")

    with pytest.raises(StoreError) as failed:
        await hooks.final_sync(spawner, "stop")

    message = str(failed.value)
    assert message.startswith("The backup of your workspace before the stop failed (")
    assert "stopped with its disk kept" in message
    assert "secret" not in message and CREDENTIALS["secret_access_key"] not in message
    assert engine_of(sync_env).snapshots() == []


async def test_final_sync_without_the_servers_address_raises(sync_env: dict[str, str]) -> None:
    with pytest.raises(StoreError, match="does not know your server's address"):
        await hooks.final_sync(remote_spawner(None), "stop")


async def test_restore_at_spawn_runs_once_the_new_pods_server_answers(
    jupyter,  # noqa: F811
    sync_env: dict[str, str],
) -> None:
    old = jupyter()
    write(old.root, "notebooks/a.ipynb", '{"cells": []}')
    write(old.root, "data/big.bin", bytes(range(256)) * 2000)  # several upload chunks
    await hooks.final_sync(remote_spawner(old), "stop")
    new = jupyter()
    spawner = remote_spawner(new)

    await hooks.restore_new_workspace(spawner)

    # Nothing yet: the pod does not exist before the backend starts it; the restore waits for its server.
    [restore] = spawner.server_ready_hooks
    assert contents(new.root) == {}
    report = await restore(new.url, new.token)

    assert report is not None and report.files == 2
    assert contents(new.root) == contents(old.root)
    messages = [m for _, m in spawner.events]
    assert messages[0] == "Restoring your workspace from backup"
    assert any(m == "Restoring your workspace from backup: 100%" for m in messages)
    assert messages[-1].startswith("Restored 2 files from your backup of ")
    assert all(81 <= p <= 89 for p, _ in spawner.events)

    # A pod whose disk was kept (resumed) is not empty: left alone.
    write(new.root, "notebooks/a.ipynb", "changed since")
    assert await restore(new.url, new.token) is None
    assert (new.root / "notebooks" / "a.ipynb").read_text() == "changed since"


async def test_a_failed_restore_at_spawn_is_said_and_the_start_goes_on(
    jupyter,  # noqa: F811
    sync_env: dict[str, str],
) -> None:
    old = jupyter()
    write(old.root, "a.txt", "a")
    await hooks.final_sync(remote_spawner(old), "stop")
    new = jupyter()
    spawner = remote_spawner(new)
    await hooks.restore_new_workspace(spawner)
    [restore] = spawner.server_ready_hooks

    assert await restore(new.url, "not-its-token") is None

    progress, message = spawner.events[-1]
    assert progress == 89
    assert message.startswith("Your workspace could not be restored from backup (")


class FakeHub:
    """HubClient.users(state="ready") as the hub answers it with admin:server_state."""

    def __init__(self, users: list[dict[str, Any]]) -> None:
        self._users = users
        self.asked: list[str | None] = []

    async def users(self, state: str | None = None) -> AsyncIterator[dict[str, Any]]:
        self.asked.append(state)
        for user in self._users:
            yield user

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        self.asked.append(f"{method} {path}")
        return next(u for u in self._users if path == f"/users/{u['name']}")


class OneServerTokens(ServerTokens):
    """ServerTokens as the hub mints them, for one test server whose token is known: records who asked for what
    (its own ``get``, ``refused`` and ``prune``; the real ``use``)."""

    def __init__(self, token: str) -> None:  # no hub: nothing is minted
        self.token = token
        self.asked: list[tuple[str, str]] = []
        self.refused_tokens: list[str] = []
        self.present: set[tuple[str, str]] | None = None

    async def get(self, user: str, server: str, *, valid_for_seconds: float = 300) -> str:
        self.asked.append((user, server))
        return self.token

    async def refused(self, user: str, server: str, token: str) -> None:
        self.refused_tokens.append(token)

    async def prune(self, present: set[tuple[str, str]]) -> None:
        self.present = present


@pytest.fixture
def backups(sync_env: dict[str, str], tmp_path: Path) -> Iterator[Backups]:
    b = Backups(SyncSettings.from_env(sync_env), tmp_path / "ws", tmp_path / "cache", concurrency=2)
    yield b
    b.close()


async def test_the_periodic_backup_reads_remote_servers_at_their_own_address(
    jupyter,  # noqa: F811
    sync_env: dict[str, str],
    backups: Backups,
) -> None:
    server = jupyter()
    write(server.root, "work/a.txt", "a")
    before = server.last_activity()
    hub = FakeHub(
        [
            {
                "name": "alice",
                "servers": {"": {"ready": True, "state": {"backend": "runpod", "server_url": server.url}}},
            },
            # Not ready, or a local folder (the local sweep's), or no address: not for the remote sweep.
            {
                "name": "bob",
                "servers": {"": {"ready": False, "state": {"backend": "runpod", "server_url": server.url}}},
            },
            {"name": "carol", "servers": {"": {"ready": True, "state": {"backend": "local", "workspace": "/srv/c"}}}},
            {"name": "dave", "servers": {"": {"ready": True, "state": {"backend": "runpod"}}}},
        ]
    )

    tokens = OneServerTokens(server.token)
    outcomes = await sweep_remote(backups, hub, tokens)

    assert list(outcomes) == ["alice"]
    assert outcomes["alice"].startswith("snapshot ")
    assert [f.path for f in engine_of(sync_env).manifest().files] == ["work/a.txt"]
    assert server.last_activity() == before
    again = await sweep_remote(backups, hub, tokens)
    assert again == {"alice": "unchanged (remote)"}
    # Each backup asked for a token of alice's server alone; tokens of servers no longer listed are let go.
    assert tokens.asked == [("alice", ""), ("alice", "")] and tokens.present == {("alice", "")}


async def test_a_token_the_server_refuses_is_replaced_once(
    jupyter,  # noqa: F811
    sync_env: dict[str, str],
    backups: Backups,
) -> None:
    server = jupyter()
    write(server.root, "work/a.txt", "a")
    hub = FakeHub(
        [{"name": "alice", "servers": {"": {"ready": True, "state": {"backend": "runpod", "server_url": server.url}}}}]
    )
    tokens = OneServerTokens("revoked-by-its-owner")
    outcomes = await sweep_remote(backups, hub, tokens)
    assert outcomes["alice"].startswith("failed: Your server refused the hub's access")
    assert tokens.refused_tokens == ["revoked-by-its-owner"] * 2 and len(tokens.asked) == 2


def test_the_service_mints_server_tokens_only_for_remote_backups(sync_env: dict[str, str]) -> None:
    plain = sync_service(sync_env, "/srv/ws", "/srv/data")
    assert plain is not None
    assert "tokens" not in plain.role["scopes"]
    # Never access to every server: its own token must not be what a user's server receives.
    assert not any(s.startswith("access:servers") for s in plain.role["scopes"])
    assert "DOLAB_SYNC_REMOTE_SERVERS" not in plain.service["environment"]

    with_runpod = sync_service({**sync_env, "RUNPOD_API_KEY": "rp-key"}, "/srv/ws", "/srv/data")
    assert with_runpod is not None
    assert with_runpod.role["scopes"][-1] == "tokens"
    assert not any(s.startswith("access:servers") for s in with_runpod.role["scopes"])
    # The service learns it from its own variable; the RunPod key never reaches it.
    assert with_runpod.service["environment"]["DOLAB_SYNC_REMOTE_SERVERS"] == "1"
    assert "RUNPOD_API_KEY" not in with_runpod.service["environment"]

    off = sync_service({**sync_env, "RUNPOD_API_KEY": "rp-key", "DOLAB_SYNC_REMOTE_SERVERS": "0"}, "/srv/ws", "/d")
    assert off is not None and "tokens" not in off.role["scopes"]


async def test_one_remote_server_is_backed_up_on_request(
    jupyter,  # noqa: F811
    sync_env: dict[str, str],
    backups: Backups,
) -> None:
    """The culler's backup before a stop (POST api/backup with the server's name) reaches a remote server."""
    server = jupyter()
    write(server.root, "work/b.txt", "b")
    hub = FakeHub(
        [
            {
                "name": "alice",
                "servers": {
                    "gpu": {"ready": True, "state": {"backend": "runpod", "server_url": server.url}},
                    "cpu": {"ready": True, "state": {"backend": "local", "workspace": "/srv/a"}},
                },
            }
        ]
    )

    tokens = OneServerTokens(server.token)
    report = await backup_remote_server(backups, hub, tokens, "alice", "gpu")

    assert report is not None and report.snapshot
    assert [f.path for f in engine_of(sync_env).manifest().files] == ["work/b.txt"]
    # A local server, or one the user does not have, is not the remote path's to back up.
    assert tokens.asked == [("alice", "gpu")]
    assert await backup_remote_server(backups, hub, tokens, "alice", "cpu") is None
    assert await backup_remote_server(backups, hub, tokens, "alice", "other") is None
