"""DOLAB_SYNC_TARGET=drive: the settings build each user's Google Drive store (a service account), and a workspace
goes there and back through the engine, on the Drive emulator (tests/drive_emulator) with the real pydrive2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import dolab_services.sync.drive  # noqa: F401  (first: it works around a broken pyOpenSSL before googleapiclient)
from dolab_services.sync.config import SyncSettings
from dolab_services.sync.engine import SyncEngine
from dolab_services.sync.registration import sync_service
from tests.drive_emulator import DriveEmulator, DriveEmulatorClient

from .treeutil import describe, sample_workspace, without


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DriveEmulatorClient]:
    emulator = DriveEmulator(log_path=tmp_path_factory.mktemp("drive-emulator") / "emulator.log")
    client = emulator.start()
    try:
        yield client
    finally:
        emulator.stop()


def test_drive_target_from_the_environment(emulator: DriveEmulatorClient, tmp_path: Path) -> None:
    emulator.reset()
    key = emulator.service_account("backup@dolab-test.iam.gserviceaccount.com").write_key_file(tmp_path / "sa.json")
    env = {"DOLAB_SYNC_DRIVE_KEY_FILE": str(key), "DOLAB_SYNC_DRIVE_API_URL": emulator.url}
    settings = SyncSettings.from_env(env)
    assert settings.target == "drive" and settings.enabled
    registration = sync_service(env, "/srv/ws", "/srv/data")
    assert registration is not None
    assert registration.service["environment"]["DOLAB_SYNC_DRIVE_KEY_FILE"] == str(key)

    ws = tmp_path / "ws"
    sample_workspace(ws)
    alice = settings.store_for("alice")
    assert alice.description == "Google Drive folder DO-LAB backups/alice"
    report = SyncEngine(alice, settings.policy()).backup(ws)
    assert report.snapshot is not None

    out = tmp_path / "out"
    out.mkdir()
    SyncEngine(settings.store_for("alice"), settings.policy()).restore(out)
    assert describe(out) == without(describe(ws), ".ipynb_checkpoints", "pkg/__pycache__")
    assert SyncEngine(settings.store_for("bob")).snapshots() == []


def test_drive_target_needs_a_key() -> None:
    with pytest.raises(ValueError, match="DOLAB_SYNC_DRIVE_KEY_FILE"):
        SyncSettings.from_env({"DOLAB_SYNC_TARGET": "drive"})
    with pytest.raises(ValueError, match="s3 or drive"):
        SyncSettings.from_env({"DOLAB_SYNC_TARGET": "ftp"})
