"""The Google Drive emulator as a process for the whole session, reset before each test: for the emulator's own
tests here, and imported by tests/sync/conftest.py for the Drive store's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# Before any test module imports googleapiclient: it imports oauth2client, which a broken pyOpenSSL would crash
# (dolab_services.sync.drive_auth._import_pydrive2 explains and works around it).
import dolab_services.sync.drive  # noqa: F401
from tests.drive_emulator import DriveEmulator, DriveEmulatorClient


@pytest.fixture(scope="session")
def drive_emulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DriveEmulatorClient]:
    """One emulator on a free loopback port; its log is kept beside the test's temporary files."""
    log_path: Path = tmp_path_factory.mktemp("drive-emulator") / "emulator.log"
    emulator = DriveEmulator(log_path=log_path)
    client = emulator.start()
    try:
        yield client
    finally:
        emulator.stop()


@pytest.fixture
def drive(drive_emulator_process: DriveEmulatorClient) -> DriveEmulatorClient:
    """The emulator's control client, with an empty world (no accounts, files, faults or logged requests)."""
    drive_emulator_process.reset()
    return drive_emulator_process
