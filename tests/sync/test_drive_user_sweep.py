"""The service's periodic backup in Drive user-token mode (Backups.sweep), on the Drive emulator: each user's
backup reads that user's auth_state and goes to their own Drive; a user without a token is skipped, not failed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dolab_services.sync.backups import Backups
from dolab_services.sync.config import SyncSettings, user_prefix
from tests.drive_emulator import DriveEmulatorClient
from tests.sync.treeutil import write

CLIENT_ID = "dolab-hub.apps.googleusercontent.com"
CLIENT_SECRET = "hub-client-secret"
DRIVE_FILE = "https://www.googleapis.com/auth/drive.file"


class RunningServers:
    """The part of HubClient a sweep uses: the users with a ready server and its workspace folder."""

    def __init__(self, workspaces: dict[str, Path]) -> None:
        self.workspaces = workspaces

    async def users(self, state: str | None = "active") -> AsyncIterator[dict[str, Any]]:
        for name, folder in self.workspaces.items():
            yield {"name": name, "servers": {"": {"ready": True, "state": {"workspace": str(folder)}}}}


def test_a_sweep_backs_each_user_up_with_their_own_token(drive: DriveEmulatorClient, tmp_path: Path) -> None:
    drive.oauth_client(CLIENT_ID, CLIENT_SECRET)
    states: dict[str, dict[str, Any]] = {}
    for user in ("alice", "bob"):
        grant = drive.user_grant(f"{user}@example.org", CLIENT_ID, CLIENT_SECRET)
        states[user] = {
            "access_token": grant.access_token,
            "refresh_token": grant.refresh_token,
            "expires_at": time.time() + grant.expires_in,
            "scope": [DRIVE_FILE],
        }
    asked: list[str] = []

    async def auth_state(user: str) -> dict[str, Any] | None:
        asked.append(user)
        return states.get(user)

    settings = SyncSettings.from_env({"DOLAB_SYNC_DRIVE_AUTH": "user", "DOLAB_SYNC_DRIVE_API_URL": drive.url})
    root = tmp_path / "workspaces"
    for user in ("alice", "bob", "carol"):
        write(root / user_prefix(user), "notes.txt", f"{user}'s notes")
    backups = Backups(settings, root, tmp_path / "cache", auth_states=auth_state)
    try:
        servers = RunningServers({u: root / user_prefix(u) for u in ("alice", "bob", "carol")})
        outcomes = asyncio.run(backups.sweep(servers))  # type: ignore[arg-type]
    finally:
        backups.close()

    assert outcomes["alice"].startswith("snapshot ") and outcomes["bob"].startswith("snapshot ")
    assert outcomes["carol"] == "skipped: no Google Drive token"
    assert sorted(asked) == ["alice", "bob", "carol"]
    owners = {f["owner"] for f in drive.files() if f["title"] == "alice"}
    assert owners == {"alice@example.org"}
    assert {f["owner"] for f in drive.files() if f["title"] == "bob"} == {"bob@example.org"}
    assert not [f for f in drive.files() if f["title"] == "carol"]
