"""Backups to each user's own Google Drive, and users' choice of target, end to end: a real hub (the shipped config,
local backend, real proxy) managing the real dolab-sync service, the Drive emulator (tests/drive_emulator) as Google
and moto_server as S3.

Users' Google tokens sit in the hub's encrypted auth_state, written through the hub API (``PATCH /users/:name``) as
the DO-LAB Google login would after a sign-in with Drive access. The hub offers ``drive`` (the default, users' own
tokens) and ``s3``.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dolab_services.sync.config import user_prefix
from dolab_services.sync.registration import sync_service
from dolab_spawner.cli import main as dolab
from tests.drive_emulator import DriveEmulator, DriveEmulatorClient
from tests.drive_emulator.client import UserGrant
from tests.e2e.hub import REPO, Hub, free_port
from tests.patience import patience
from tests.sync.conftest import CREDENTIALS, S3Server
from tests.sync.treeutil import write

pytestmark = [pytest.mark.e2e]

CLIENT_ID = "dolab-hub.apps.googleusercontent.com"
CLIENT_SECRET = "hub-client-secret"
DRIVE_FILE = "https://www.googleapis.com/auth/drive.file"


def email(user: str) -> str:
    return f"{user}@example.org"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DriveEmulatorClient]:
    emulator = DriveEmulator(log_path=tmp_path_factory.mktemp("drive-emulator") / "emulator.log")
    client = emulator.start()
    client.oauth_client(CLIENT_ID, CLIENT_SECRET)
    try:
        yield client
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def sync_bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


def hub_env(root: Path, emulator: DriveEmulatorClient, s3_server: S3Server, bucket: str) -> dict[str, str]:
    return {
        "JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32),
        "DOLAB_WORKSPACE_ROOT": str(root / "workspaces"),
        "DOLAB_SYNC_TARGET": "drive",
        "DOLAB_SYNC_TARGETS": "drive,s3",
        "DOLAB_SYNC_DRIVE_AUTH": "user",
        "DOLAB_SYNC_DRIVE_API_URL": emulator.url,
        "DOLAB_SYNC_S3_BUCKET": bucket,
        "DOLAB_SYNC_S3_ENDPOINT": s3_server.endpoint_url,
        "DOLAB_SYNC_S3_REGION": CREDENTIALS["region_name"],
        "DOLAB_SYNC_S3_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "DOLAB_SYNC_S3_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
        "DOLAB_SYNC_INTERVAL_MINUTES": "0",
        "DOLAB_SYNC_PORT": str(free_port()),
        "PYTHONPATH": str(REPO),
    }


@pytest.fixture(scope="module")
def hub(
    emulator: DriveEmulatorClient, s3_server: S3Server, sync_bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("drive-user-hub")
    overlay = "c.Authenticator.enable_auth_state = True\n"
    hub = Hub(root, overlay=overlay, env=hub_env(root, emulator, s3_server, sync_bucket)).start()
    try:
        wait_for_service(hub)
        yield hub
    finally:
        hub.shutdown()


def wait_for_service(hub: Hub, timeout: float = 60) -> None:
    deadline = time.monotonic() + patience(timeout)
    while True:
        try:
            if requests.get(f"{hub.url}/services/dolab-sync/api/backups", timeout=5).status_code == 403:
                return  # up, and asking for a login
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"dolab-sync did not answer:\n{hub.log_tail()}")
        time.sleep(0.2)


def sign_in_with_drive(hub: Hub, emulator: DriveEmulatorClient, user: str) -> UserGrant:
    """What the DO-LAB Google login leaves in auth_state after a sign-in with Drive access."""
    hub.create_user(user)
    grant = emulator.user_grant(email(user), CLIENT_ID, CLIENT_SECRET)
    store_auth_state(hub, user, grant.access_token, grant.refresh_token, grant.expires_in)
    return grant


def store_auth_state(hub: Hub, user: str, access_token: str, refresh_token: str, expires_in: int) -> None:
    state = {
        "access_token": access_token,
        "refresh_token": refresh_token,
        "expires_at": time.time() + expires_in,
        "scope": ["openid", "email", DRIVE_FILE],
        "token_response": {"access_token": access_token, "token_type": "Bearer"},
        "oauth_user": {"email": email(user)},
    }
    reply = hub.api("PATCH", f"/users/{user}", json={"auth_state": state})
    assert reply.status_code == 200, reply.text


def workspace(hub: Hub, user: str) -> Path:
    return Path(hub.env["DOLAB_WORKSPACE_ROOT"]) / user_prefix(user)


def api(hub: Hub, token: str, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(
        method,
        f"{hub.url}/services/dolab-sync/api/{path}",
        headers={"Authorization": f"token {token}"},
        timeout=120,
        **kwargs,
    )


def drive_titles(emulator: DriveEmulatorClient, email: str) -> list[str]:
    return [f["title"] for f in emulator.files(email) if not f["trashed"]]


def test_the_role_reads_auth_state_only_in_user_token_mode(hub: Hub) -> None:
    role = sync_service(hub.env, "/ws", "/data")
    assert role is not None and "admin:auth_state" in role.role["scopes"]
    env = {k: v for k, v in hub.env.items() if k not in ("DOLAB_SYNC_DRIVE_AUTH", "DOLAB_SYNC_TARGET")}
    s3_only = sync_service({**env, "DOLAB_SYNC_TARGETS": "s3"}, "/ws", "/data")
    assert s3_only is not None and "admin:auth_state" not in s3_only.role["scopes"]


def test_a_backup_goes_to_the_users_own_drive_and_comes_back(hub: Hub, emulator: DriveEmulatorClient) -> None:
    alice_grant = sign_in_with_drive(hub, emulator, "alice")
    bob_grant = sign_in_with_drive(hub, emulator, "bob")
    write(workspace(hub, "alice"), "thesis/chapter1.md", "alice's chapter")
    write(workspace(hub, "bob"), "notes.txt", "bob's notes")
    alice, bob = hub.user_token("alice"), hub.user_token("bob")

    emulator.clear_requests()
    reply = api(hub, alice, "POST", "backup")
    assert reply.status_code == 200, reply.text
    assert reply.json()["snapshot"]
    served = [r for r in emulator.requests() if r["path"] != "/token" and r["status"] < 400]
    assert served and {r["email"] for r in served} == {"alice@example.org"}  # alice's token, nobody else's

    emulator.clear_requests()
    reply = api(hub, bob, "POST", "backup")
    assert reply.status_code == 200, reply.text
    served = [r for r in emulator.requests() if r["path"] != "/token" and r["status"] < 400]
    assert served and {r["email"] for r in served} == {"bob@example.org"}

    # Each Drive holds its owner's folder only: DO-LAB backups/<user>/snapshots/...
    alice_titles, bob_titles = drive_titles(emulator, "alice@example.org"), drive_titles(emulator, "bob@example.org")
    assert {"DO-LAB backups", "alice"} <= set(alice_titles) and "bob" not in alice_titles
    assert {"DO-LAB backups", "bob"} <= set(bob_titles) and "alice" not in bob_titles
    assert any(t.startswith("snapshots/") for t in alice_titles)

    listing = api(hub, alice, "GET", "backups").json()
    assert listing["target_name"] == "drive"
    assert listing["target"] == "Google Drive folder DO-LAB backups/alice"
    assert len(listing["snapshots"]) == 1

    # A deleted file comes back from alice's Drive.
    (workspace(hub, "alice") / "thesis" / "chapter1.md").unlink()
    reply = api(hub, alice, "POST", "restore", json={"paths": ["thesis/chapter1.md"]})
    assert reply.status_code == 200, reply.text
    assert (workspace(hub, "alice") / "thesis" / "chapter1.md").read_text() == "alice's chapter"

    # Tokens never reach the log (the hub's and its services').
    log = hub.log_path.read_text(errors="replace")
    for grant in (alice_grant, bob_grant):
        assert grant.access_token not in log and grant.refresh_token not in log


def test_the_token_is_read_again_at_each_backup(hub: Hub, emulator: DriveEmulatorClient) -> None:
    sign_in_with_drive(hub, emulator, "dora")
    write(workspace(hub, "dora"), "a.txt", "one")
    dora = hub.user_token("dora")
    assert api(hub, dora, "POST", "backup").status_code == 200

    # Google ends the access token; the hub renews it (here: a new sign-in stores a new one).
    emulator.expire_access_tokens("dora@example.org")
    write(workspace(hub, "dora"), "b.txt", "two")
    fresh = emulator.user_grant("dora@example.org", CLIENT_ID, CLIENT_SECRET)
    store_auth_state(hub, "dora", fresh.access_token, fresh.refresh_token, fresh.expires_in)
    reply = api(hub, dora, "POST", "backup")
    assert reply.status_code == 200, reply.text
    assert reply.json()["snapshot"]


def test_a_user_without_a_drive_token_is_told_to_sign_in_again(hub: Hub) -> None:
    hub.create_user("carol")
    write(workspace(hub, "carol"), "x.txt", "x")
    reply = api(hub, hub.user_token("carol"), "POST", "backup")
    assert reply.status_code == 409, reply.text
    assert reply.json()["message"] == (
        "carol has no Google Drive token for backups; sign in with Google again to allow Drive backups."
    )


def test_a_user_picks_a_target_within_the_policy(
    hub: Hub, emulator: DriveEmulatorClient, s3_server: S3Server, sync_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.create_user("erin")  # no Drive token: a backup to Drive would be refused
    erin = hub.user_token("erin")
    write(workspace(hub, "erin"), "data.csv", "1,2,3")

    target = api(hub, erin, "GET", "target").json()
    assert (target["target"], target["default"], target["allowed"]) == ("drive", "drive", ["drive", "s3"])
    assert "does not move old backups" in target["note"]

    refused = api(hub, erin, "PUT", "target", json={"target": "ftp"})
    assert refused.status_code == 400
    assert refused.json()["message"] == (
        "Backups on this hub may go to drive or s3; 'ftp' is not allowed by the administrator's policy."
    )
    assert api(hub, erin, "GET", "target").json()["target"] == "drive"

    # The CLI chooses S3; the next backup goes there.
    assert dolab(["backups", "--url", hub.url, "--token", erin, "target", "s3"]) == 0
    assert "go to s3" in capsys.readouterr().out
    reply = api(hub, erin, "POST", "backup")
    assert reply.status_code == 200, reply.text
    snapshot = reply.json()["snapshot"]
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=sync_bucket)["Contents"]]
    assert f"dolab-backups/erin/snapshots/{snapshot}.json.gz" in keys
    assert not [f for f in emulator.files() if f["title"] == "erin"]

    # The choice survives a restart of the hub and the service.
    hub.restart()
    wait_for_service(hub)
    erin = hub.user_token("erin")
    assert api(hub, erin, "GET", "target").json()["target"] == "s3"
    listing = api(hub, erin, "GET", "backups").json()
    assert listing["target_name"] == "s3" and [s["id"] for s in listing["snapshots"]] == [snapshot]

    # Back to Drive: the S3 backups stay in S3, and Drive's list is its own.
    assert dolab(["backups", "--url", hub.url, "--token", erin, "target", "drive"]) == 0
    assert "does not move old backups" in capsys.readouterr().out
    missing = api(hub, erin, "GET", "backups")
    assert missing.status_code == 409 and "sign in with Google again" in missing.json()["message"]


def test_one_user_cannot_choose_for_another(hub: Hub) -> None:
    hub.create_user("frank")
    reply = api(hub, hub.user_token("frank"), "PUT", "target", json={"target": "s3", "user": "alice"})
    assert reply.status_code == 403
    assert api(hub, hub.user_token("alice"), "GET", "target").json()["target"] == "drive"


def test_the_hubs_stop_and_spawn_hooks_use_the_users_own_token(hub: Hub, emulator: DriveEmulatorClient) -> None:
    grant = sign_in_with_drive(hub, emulator, "gina")
    sign_in_with_drive(hub, emulator, "hank")  # another user with a token, never used for gina
    reply = hub.start_server("gina", {})
    assert reply.status_code in (201, 202), reply.text
    server = hub.wait_ready("gina")
    # Neither her tokens nor any backup setting reach her server.
    environ = Path(f"/proc/{server['state']['backend_state']['pid']}/environ").read_bytes()
    assert grant.access_token.encode() not in environ and grant.refresh_token.encode() not in environ
    assert b"DOLAB_SYNC_" not in environ
    write(workspace(hub, "gina"), "results/run1.txt", "accuracy 0.93")

    emulator.clear_requests()
    hub.stop_server("gina")  # the hub's final backup, with gina's token from her auth_state
    served = [r for r in emulator.requests() if r["path"] != "/token" and r["status"] < 400]
    assert served and {r["email"] for r in served} == {"gina@example.org"}
    assert any(t.startswith("snapshots/") for t in drive_titles(emulator, "gina@example.org"))
    assert not drive_titles(emulator, "hank@example.org")

    # A new, empty workspace is filled from gina's Drive at the next spawn.
    shutil.rmtree(workspace(hub, "gina"))
    reply = hub.start_server("gina", {})
    assert reply.status_code in (201, 202), reply.text
    hub.wait_ready("gina")
    assert (workspace(hub, "gina") / "results" / "run1.txt").read_text() == "accuracy 0.93"
    hub.stop_server("gina")


@pytest.fixture(scope="module")
def google_hub(
    emulator: DriveEmulatorClient, s3_server: S3Server, sync_bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hub]:
    """A hub logging in with DoLabGoogleAuthenticator (drive_backup), Google's token and user info endpoints
    being the emulator's, renewing tokens about to expire every half second. The sync service has no OAuth client
    secret: it can only read the tokens the hub renews."""
    root = tmp_path_factory.mktemp("drive-google-hub")
    overlay = f"""
from dolab_spawner.auth import DoLabGoogleAuthenticator
c.JupyterHub.authenticator_class = DoLabGoogleAuthenticator
c.DoLabGoogleAuthenticator.client_id = {CLIENT_ID!r}
c.DoLabGoogleAuthenticator.client_secret = {CLIENT_SECRET!r}
c.DoLabGoogleAuthenticator.oauth_callback_url = "http://127.0.0.1/hub/oauth_callback"
c.DoLabGoogleAuthenticator.token_url = {emulator.token_uri!r}
c.DoLabGoogleAuthenticator.userdata_url = {emulator.url + "/oauth2/v1/userinfo"!r}
c.DoLabGoogleAuthenticator.drive_backup = True
c.DoLabGoogleAuthenticator.allow_all = True
c.DoLabGoogleAuthenticator.token_refresh_interval_seconds = 0.5
"""
    env = hub_env(root, emulator, s3_server, sync_bucket)
    assert "DOLAB_SYNC_DRIVE_CLIENT_SECRET" not in env
    hub = Hub(root, overlay=overlay, env=env).start()
    try:
        wait_for_service(hub)
        yield hub
    finally:
        hub.shutdown()


def test_the_hub_renews_the_token_and_the_service_uses_the_fresh_one(
    google_hub: Hub, emulator: DriveEmulatorClient
) -> None:
    hub = google_hub
    hub.create_user("ivy")
    grant = emulator.user_grant(email("ivy"), CLIENT_ID, CLIENT_SECRET)
    emulator.expire_access_tokens(email("ivy"))  # Google no longer takes the stored access token
    store_auth_state(hub, "ivy", grant.access_token, grant.refresh_token, expires_in=30)  # within the renewal margin

    deadline = time.monotonic() + patience(60)
    while hub.user("ivy")["auth_state"]["access_token"] == grant.access_token:
        assert time.monotonic() < deadline, f"the hub did not renew ivy's token:\n{hub.log_tail()}"
        time.sleep(0.2)
    renewed = hub.user("ivy")["auth_state"]
    assert renewed["refresh_token"] == grant.refresh_token and renewed["expires_at"] > time.time() + 60

    write(workspace(hub, "ivy"), "paper.tex", "\\section{Results}")
    emulator.clear_requests()
    reply = api(hub, hub.user_token("ivy"), "POST", "backup")
    assert reply.status_code == 200, reply.text
    assert reply.json()["snapshot"]
    assert [r for r in emulator.requests() if r["path"] == "/token"] == []  # the service renewed nothing itself
    assert any(t.startswith("snapshots/") for t in drive_titles(emulator, email("ivy")))
    log = hub.log_path.read_text(errors="replace")
    assert renewed["access_token"] not in log and grant.refresh_token not in log
