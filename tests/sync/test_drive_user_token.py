"""DriveStore with a user's own token handed over by the hub (UserToken.renew), on the Drive emulator.

The sync service reads each user's token from the hub, which renews it; the store asks ``renew`` for a fresh one
when its token has expired or Drive refuses it, and renews the token itself only when it knows the OAuth client.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import requests

from dolab_services.sync.config import SyncSettings
from dolab_services.sync.drive import DriveSettings, DriveStore
from dolab_services.sync.drive_auth import UserToken
from dolab_services.sync.store import StoreError
from dolab_services.sync.tokens import NoDriveToken, drive_token
from tests.drive_emulator import DriveEmulatorClient
from tests.drive_emulator.client import UserGrant

CLIENT_ID = "dolab-hub.apps.googleusercontent.com"
CLIENT_SECRET = "hub-client-secret"
DRIVE_FILE = "https://www.googleapis.com/auth/drive.file"


def settings(drive: DriveEmulatorClient) -> DriveSettings:
    return DriveSettings(api_root_url=drive.url, timeout_seconds=30.0, backoff_base_seconds=0.01)


def grant(drive: DriveEmulatorClient, email: str) -> UserGrant:
    drive.oauth_client(CLIENT_ID, CLIENT_SECRET)
    return drive.user_grant(email, CLIENT_ID, CLIENT_SECRET)


def hub_renews(drive: DriveEmulatorClient, g: UserGrant) -> tuple[str, datetime]:
    """What the hub's authenticator does before a token expires: a refresh-token grant at the token endpoint."""
    reply = requests.post(
        drive.token_uri,
        data={
            "grant_type": "refresh_token",
            "refresh_token": g.refresh_token,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        timeout=10,
    )
    reply.raise_for_status()
    data = reply.json()
    return data["access_token"], datetime.now(timezone.utc) + timedelta(seconds=int(data["expires_in"]))


def token_requests(drive: DriveEmulatorClient) -> list[dict]:
    return [r for r in drive.requests() if r["path"] == "/token"]


def hub_only_token(access_token: str | None, expires_at: datetime | None, renew=None) -> UserToken:  # type: ignore[no-untyped-def]
    """A token as the service has it without the OAuth client's secret: only the hub can renew it."""
    return UserToken(
        access_token=access_token,
        refresh_token="",
        client_id="",
        client_secret="",
        expires_at=expires_at,
        renew=renew,
    )


def test_an_expired_token_is_replaced_by_the_hubs_fresh_one(drive: DriveEmulatorClient) -> None:
    g = grant(drive, "alice@example.org")
    drive.expire_access_tokens("alice@example.org")
    asked: list[str] = []

    def renew() -> UserToken:
        asked.append("renew")
        access, expires_at = hub_renews(drive, g)
        return hub_only_token(access, expires_at)

    stale = hub_only_token(g.access_token, datetime.now(timezone.utc) - timedelta(seconds=5), renew)
    drive.clear_requests()
    store = DriveStore("alice", stale, settings(drive))
    store.put_bytes("snapshots/a.json.gz", b"hello")
    assert asked == ["renew"]
    assert len(token_requests(drive)) == 1  # the hub's renewal: the store itself never went to the token endpoint
    served = [r for r in drive.requests() if r["path"] != "/token" and r["status"] < 400]
    assert {r["email"] for r in served} == {"alice@example.org"}

    # Google drops the access token early: the 401 asks the hub again and the call goes through.
    drive.expire_access_tokens("alice@example.org")
    assert store.get_bytes("snapshots/a.json.gz") == b"hello"
    assert asked == ["renew", "renew"]
    assert len(token_requests(drive)) == 2


def test_without_a_fresh_token_or_the_client_secret_the_user_is_told(drive: DriveEmulatorClient) -> None:
    g = grant(drive, "alice@example.org")
    drive.expire_access_tokens("alice@example.org")
    stale_at = datetime.now(timezone.utc) - timedelta(seconds=5)
    same = hub_only_token(g.access_token, stale_at)
    store = DriveStore("alice", hub_only_token(g.access_token, stale_at, lambda: same), settings(drive))
    with pytest.raises(StoreError, match="refused the stored credentials of alice; sign in to DO-LAB again"):
        store.put_bytes("x", b"1")
    assert token_requests(drive) == []


def test_the_service_renews_itself_only_with_the_client_secret(drive: DriveEmulatorClient) -> None:
    g = grant(drive, "alice@example.org")
    drive.expire_access_tokens("alice@example.org")
    past = datetime.now(timezone.utc) - timedelta(seconds=5)
    token = UserToken(
        access_token=g.access_token,
        refresh_token=g.refresh_token,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        expires_at=past,
        token_uri=drive.token_uri,
        renew=lambda: None,  # the hub has nothing newer
    )
    DriveStore("alice", token, settings(drive)).put_bytes("x", b"1")
    assert len(token_requests(drive)) == 1


def test_drive_token_from_auth_state() -> None:
    s = SyncSettings.from_env(
        {
            "DOLAB_SYNC_DRIVE_AUTH": "user",
            "DOLAB_SYNC_DRIVE_CLIENT_ID": CLIENT_ID,
            "DOLAB_SYNC_DRIVE_CLIENT_SECRET": CLIENT_SECRET,
            "DOLAB_SYNC_DRIVE_TOKEN_URI": "http://127.0.0.1:9/token",
        }
    )
    state = {
        "access_token": "ya29.secret-access",
        "refresh_token": "1//secret-refresh",
        "expires_at": 1_900_000_000,
        "scope": ["openid", "email", DRIVE_FILE],
    }
    token = drive_token(s, state)
    assert token is not None
    assert (token.access_token, token.refresh_token, token.client_id, token.token_uri) == (
        "ya29.secret-access",
        "1//secret-refresh",
        CLIENT_ID,
        "http://127.0.0.1:9/token",
    )
    assert token.expires_at == datetime.fromtimestamp(1_900_000_000, timezone.utc)
    assert token.can_refresh
    assert "secret" not in repr(token)
    # Signed in before Drive backups were switched on: no Drive scope, no Drive token.
    assert drive_token(s, {**state, "scope": "openid email"}) is None
    assert drive_token(s, {"scope": [DRIVE_FILE]}) is None
    assert drive_token(s, None) is None
    with pytest.raises(NoDriveToken, match="sign in with Google again to allow Drive backups"):
        s.store_for("carol", "drive")
