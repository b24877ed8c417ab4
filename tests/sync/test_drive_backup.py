"""A whole workspace backed up to Google Drive and restored, through the sync engine, on the Drive emulator."""

from __future__ import annotations

from pathlib import Path

from dolab_services.sync.drive import DriveSettings, DriveStore
from dolab_services.sync.drive_auth import ServiceAccountKey
from dolab_services.sync.engine import SyncEngine, SyncPolicy
from tests.drive_emulator import DriveEmulatorClient
from tests.sync.treeutil import MiB, big_file, describe, sample_workspace, without, write

EXCLUDED = (".ipynb_checkpoints", "pkg/__pycache__")
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def test_workspace_backup_and_restore_through_drive(drive: DriveEmulatorClient, tmp_path: Path) -> None:
    key = drive.service_account("backup@dolab-test.iam.gserviceaccount.com").write_key_file(tmp_path / "sa.json")
    settings = DriveSettings(api_root_url=drive.url, chunk_size_bytes=4 * MiB, backoff_base_seconds=0.01)
    store = DriveStore("alice", ServiceAccountKey(key), settings)
    engine = SyncEngine(store, SyncPolicy(keep_snapshots=2, workers=4))
    ws, cache = tmp_path / "ws", tmp_path / "cache.json.gz"
    sample_workspace(ws)
    big_file(ws / "models" / "weights.bin", 30 * MiB)

    first = engine.backup(ws, cache_path=cache)
    assert first.snapshot is not None and first.files == 8
    chunk_puts = [r for r in drive.requests() if r["method"] == "PUT" and "upload_id" in r["query"]]
    assert len(chunk_puts) == 8  # the 30 MiB file went up resumably, 4 MiB at a time

    # Nothing changed: nothing is written to Drive.
    drive.clear_requests()
    again = engine.backup(ws, cache_path=cache)
    assert again.snapshot is None and again.uploaded_files == 0
    assert [r for r in drive.requests() if r["method"] in WRITES] == []

    # A fresh store (another process) restores the workspace as it was.
    restored = tmp_path / "restored"
    restored.mkdir()
    SyncEngine(DriveStore("alice", ServiceAccountKey(key), settings)).restore(restored)
    assert describe(restored) == without(describe(ws), *EXCLUDED)

    # A deleted file comes back from the older restore point; retention keeps two snapshots.
    (ws / "notebooks" / "analysis.ipynb").unlink()
    write(ws, "notebooks/new.ipynb", '{"cells": [1]}')
    second = engine.backup(ws, cache_path=cache)
    assert second.snapshot is not None
    engine.restore(ws, snapshot_id=first.snapshot, paths=["notebooks/analysis.ipynb"])
    assert (ws / "notebooks" / "analysis.ipynb").read_text() == '{"cells": []}'
    write(ws, "third.txt", "3")
    third = engine.backup(ws, cache_path=cache)
    assert [s.id for s in engine.snapshots()] == [second.snapshot, third.snapshot]
    titles = [f["title"] for f in drive.files() if not f["trashed"]]
    assert sum(t.startswith("snapshots/") for t in titles) == 2
