"""The sync engine against a real S3 server (moto_server): round trips, incremental runs, crashes, retention."""

from __future__ import annotations

import collections
import gzip
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dolab_services.sync.engine import SyncEngine, SyncPolicy
from dolab_services.sync.manifest import BLOB_PREFIX, FileRecord, Manifest, blob_key, snapshot_key
from dolab_services.sync.s3 import S3Store
from dolab_services.sync.store import ObjectNotFound, StoreError
from dolab_services.sync.workspace import Excludes, UnsafePath, leaving_links, open_file

from .conftest import CREDENTIALS, S3Server
from .treeutil import MiB, big_file, describe, sample_workspace, without, write

EXCLUDED = (".ipynb_checkpoints", "pkg/__pycache__")


def count_requests(store: S3Store) -> collections.Counter:
    """Every S3 operation the store's client sends from now on, by name."""
    counts: collections.Counter = collections.Counter()

    def seen(model, **kwargs):  # type: ignore[no-untyped-def]
        counts[model.name] += 1

    store.client.meta.events.register("before-call.s3", seen)
    return counts


WRITES = ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "DeleteObjects")


@pytest.fixture
def store(s3_server: S3Server, bucket: str) -> S3Store:
    return s3_server.store(bucket, "backups/alice")


def test_round_trip_with_a_200_mb_file(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    sample_workspace(ws)
    big_file(ws / "models" / "weights.bin", 200 * MiB)
    engine = SyncEngine(store)
    counts = count_requests(store)

    report = engine.backup(ws, cache_path=tmp_path / "cache.json.gz")

    assert report.snapshot is not None
    assert report.files == 8
    # The 200 MB file went up as 25 pieces of 8 MiB (a later change uploads only the pieces it touches).
    [weights] = [f for f in engine.manifest().files if f.path == "models/weights.bin"]
    assert len(weights.chunks) == 25 and len(set(weights.chunks)) > 1
    assert counts["PutObject"] == 7 + len(set(weights.chunks)) + 1  # small files, distinct pieces, manifest
    restored = tmp_path / "restored"
    restored.mkdir()
    engine.restore(restored)
    # Excluded names stay behind; everything else comes back as it was (content, mode, mtime, links, empty folders).
    assert describe(restored) == without(describe(ws), *EXCLUDED)
    assert (restored / "latest.ipynb").is_symlink()


def test_an_unchanged_rerun_moves_nothing(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    sample_workspace(ws)
    engine = SyncEngine(store)
    cache = tmp_path / "cache.json.gz"
    first = engine.backup(ws, cache_path=cache)
    counts = count_requests(store)

    again = engine.backup(ws, cache_path=cache)

    assert again.snapshot is None and again.previous == first.snapshot
    assert again.hashed_files == 0 and again.uploaded_files == 0
    assert not any(counts[op] for op in WRITES), counts
    assert [s.id for s in engine.snapshots()] == [first.snapshot]


def test_changes_are_found_even_with_the_same_size_and_an_older_time(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    old = time.time_ns() - 86_400 * 10**9
    write(ws, "same-size.txt", "AAAA", mtime_ns=old)
    write(ws, "restored.txt", "new version")
    write(ws, "appended.txt", "line\n")
    engine = SyncEngine(store)
    cache = tmp_path / "cache.json.gz"
    engine.backup(ws, cache_path=cache)

    write(ws, "same-size.txt", "BBBB", mtime_ns=old)  # same size, same mtime: only the ctime tells
    write(ws, "restored.txt", "old version", mtime_ns=old - 10**9)  # as `cp -p` / `tar x` of an older copy
    with open(ws / "appended.txt", "a") as f:
        f.write("more\n")
    report = engine.backup(ws, cache_path=cache)

    assert report.snapshot is not None and report.uploaded_files == 3
    out = tmp_path / "out"
    out.mkdir()
    engine.restore(out)
    assert describe(out) == describe(ws)


def test_renamed_and_copied_files_are_not_uploaded_again(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    write(ws, "a/data.bin", os.urandom(MiB))
    engine = SyncEngine(store)
    engine.backup(ws)
    (ws / "a" / "data.bin").rename(ws / "b.bin")
    shutil.copy(ws / "b.bin", ws / "c.bin")

    report = engine.backup(ws)  # no cache at all: everything is hashed, nothing is uploaded

    assert report.snapshot is not None and report.hashed_files == 2 and report.uploaded_files == 0


class _FailingStore:
    """A store that fails after ``good`` uploads: an injected crash in the middle of a sync."""

    def __init__(self, inner: S3Store, good: int) -> None:
        self.inner, self.good, self.description = inner, good, inner.description

    def put_file(self, key: str, path: Path) -> None:
        if self.good <= 0:
            raise StoreError("The backup store failed (injected).")
        self.good -= 1
        self.inner.put_file(key, path)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


def test_a_failure_mid_sync_leaves_the_previous_snapshot_whole(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    for i in range(20):
        write(ws, f"f{i}.txt", f"version 1 of {i}")
    engine = SyncEngine(store, SyncPolicy(workers=1))
    first = engine.backup(ws)
    before = describe(ws)
    for i in range(20):
        write(ws, f"f{i}.txt", f"version 2 of {i}, longer")

    with pytest.raises(StoreError, match="injected"):
        SyncEngine(_FailingStore(store, good=5), SyncPolicy(workers=1)).backup(ws)  # type: ignore[arg-type]

    assert [s.id for s in engine.snapshots()] == [first.snapshot]
    out = tmp_path / "out"
    out.mkdir()
    engine.restore(out)
    assert describe(out) == before


def test_a_killed_sync_leaves_the_previous_snapshot_whole(s3_server: S3Server, store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    for i in range(10):
        write(ws, f"small{i}.txt", f"first {i}")
    engine = SyncEngine(store)
    first = engine.backup(ws)
    before = describe(ws)
    for i in range(40):
        big_file(ws / f"big{i}.bin", 12 * MiB, seed=str(i))  # 40 uploads, one at a time: the kill lands among them
    blobs_before = sum(1 for _ in store.list(BLOB_PREFIX))
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from dolab_services.sync.engine import SyncEngine, SyncPolicy
        from dolab_services.sync.s3 import S3Store
        store = S3Store({store.bucket!r}, {store.prefix!r}, endpoint_url={s3_server.endpoint_url!r}, **{CREDENTIALS!r})
        SyncEngine(store, SyncPolicy(workers=1)).backup(Path({str(ws)!r}))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while sum(1 for _ in store.list(BLOB_PREFIX)) < blobs_before + 3:  # some, not all, blobs are up
            assert proc.poll() is None, "the sync finished before it could be killed"
            assert time.monotonic() < deadline, "the sync uploaded nothing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)

    assert [s.id for s in engine.snapshots()] == [first.snapshot]
    out = tmp_path / "out"
    out.mkdir()
    engine.restore(out)
    assert describe(out) == before
    # The next sync finishes the job and reuses what the killed one uploaded.
    report = engine.backup(ws)
    assert report.snapshot is not None and report.uploaded_files < 40


def test_a_deleted_file_comes_back_from_an_older_snapshot(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    write(ws, "work/thesis.tex", "chapter 1")
    write(ws, "work/other.txt", "other")
    engine = SyncEngine(store)
    first = engine.backup(ws)
    (ws / "work" / "thesis.tex").unlink()
    second = engine.backup(ws)
    assert second.snapshot is not None
    assert "work/thesis.tex" not in {f.path for f in engine.manifest().files}  # mirror: gone from the latest

    with pytest.raises(ObjectNotFound, match="holds nothing"):
        engine.restore(ws, paths=["work/thesis.tex"])
    report = engine.restore(ws, snapshot_id=first.snapshot, paths=["work/thesis.tex"])

    assert report.files == 1 and (ws / "work" / "thesis.tex").read_text() == "chapter 1"


def test_keep_policy_carries_deleted_files_into_new_snapshots(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    write(ws, "a.txt", "a")
    write(ws, "b.txt", "b")
    engine = SyncEngine(store, SyncPolicy(deletions="keep"))
    engine.backup(ws)
    (ws / "a.txt").unlink()
    write(ws, "c.txt", "c")
    engine.backup(ws)
    assert {f.path for f in engine.manifest().files} == {"a.txt", "b.txt", "c.txt"}


def test_retention_keeps_the_last_n_and_collects_unused_blobs(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    engine = SyncEngine(store, SyncPolicy(keep_snapshots=2))
    ids = []
    for version in range(4):
        write(ws, "doc.txt", f"version {version}")
        ids.append(engine.backup(ws).snapshot)

    assert [s.id for s in engine.snapshots()] == ids[-2:]
    blobs = {i.key for i in store.list(BLOB_PREFIX)}
    live = {blob_key(f.sha256) for sid in ids[-2:] for f in engine.manifest(sid).files}
    assert blobs == live
    out = tmp_path / "out"
    out.mkdir()
    engine.restore(out, snapshot_id=ids[-2], paths=["doc.txt"])
    assert (out / "doc.txt").read_text() == "version 2"


def test_excludes_and_the_size_cap(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    write(ws, "keep.txt", "k")
    write(ws, "scratch/tmp.dat", "t")
    write(ws, "log.tmp", "l")
    write(ws, "huge.bin", b"x" * 2000)
    engine = SyncEngine(store, SyncPolicy(excludes=Excludes(globs=("*.tmp", "scratch/*"), max_file_bytes=1000)))
    report = engine.backup(ws)
    assert {f.path for f in engine.manifest().files} == {"keep.txt"}
    assert ("huge.bin", "2000 bytes is over the 1000-byte cap") in report.skipped


def test_one_users_store_never_sees_anothers(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    alice, bob = s3_server.store(bucket, "backups/alice"), s3_server.store(bucket, "backups/bob")
    write(tmp_path / "a", "secret.txt", "alice's")
    write(tmp_path / "b", "mine.txt", "bob's")
    SyncEngine(alice).backup(tmp_path / "a")
    SyncEngine(bob).backup(tmp_path / "b")

    assert all(not i.key.startswith("..") for i in bob.list())
    assert {f.path for f in SyncEngine(bob).manifest().files} == {"mine.txt"}
    for bad in ("../alice/snapshots/x.json.gz", "/backups/alice", "blobs/../../alice"):
        with pytest.raises(ValueError):
            bob.get_bytes(bad)
    # A prefix that merely starts like another's does not overlap it either.
    assert not list(s3_server.store(bucket, "backups/ali").list())


def test_store_errors_are_sentences(s3_server: S3Server, tmp_path: Path) -> None:
    engine = SyncEngine(s3_server.store("no-such-bucket", "x"))
    write(tmp_path, "a.txt", "a")
    with pytest.raises(StoreError, match=r"^The backup bucket no-such-bucket does not exist\."):
        engine.backup(tmp_path)
    with pytest.raises(ObjectNotFound, match="There is no restore point"):
        SyncEngine(s3_server.store(s3_server.new_bucket(), "x")).manifest("20200101T000000000000Z")


@pytest.mark.parametrize(
    "path",
    ["../outside", "/etc/passwd", "a/../../b", "a//b", "./a", "", "a/\0"],
    ids=["parent", "absolute", "climbs", "empty-part", "dot", "empty", "nul"],
)
def test_paths_that_leave_the_workspace_are_refused(store: S3Store, tmp_path: Path, path: str) -> None:
    write(tmp_path / "ws", "a.txt", "a")
    engine = SyncEngine(store)
    engine.backup(tmp_path / "ws")
    with pytest.raises(UnsafePath):
        engine.restore(tmp_path, paths=[path])


def test_a_tampered_manifest_cannot_write_outside(store: S3Store, tmp_path: Path) -> None:
    write(tmp_path / "ws", "a.txt", "a")
    engine = SyncEngine(store)
    sid = engine.backup(tmp_path / "ws").snapshot
    assert sid is not None
    manifest = engine.manifest(sid)
    evil = Manifest(sid, [FileRecord("../escaped.txt", 1, 0, 0o644, manifest.files[0].sha256)])
    store.put_bytes(snapshot_key(sid), evil.to_bytes())
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(StoreError, match="damaged"):
        engine.restore(dest)
    assert not (tmp_path / "escaped.txt").exists()


def test_symlinks_never_lead_out_of_the_workspace(store: S3Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside, "secret.txt", "host secret")
    ws = tmp_path / "ws"
    write(ws, "mine.txt", "mine")
    os.symlink(outside / "secret.txt", ws / "abs-link")
    os.symlink("../outside/secret.txt", ws / "rel-link")
    os.symlink(str(outside), ws / "dir-link")
    os.symlink("mine.txt", ws / "ok-link")
    engine = SyncEngine(store)

    report = engine.backup(ws)

    manifest = engine.manifest()
    assert [f.path for f in manifest.files] == ["mine.txt"]
    assert [(link.path, link.target) for link in manifest.links] == [("ok-link", "mine.txt")]
    assert {p for p, _ in report.skipped} == {"abs-link", "rel-link", "dir-link"}
    # A restore never writes through a symlink planted in the destination either.
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(str(outside), dest / "sub")
    write(ws, "sub/file.txt", "x")
    engine.backup(ws)
    with pytest.raises(UnsafePath):
        engine.restore(dest, paths=["sub/file.txt"])
    assert not (outside / "file.txt").exists()


def test_a_folder_swapped_for_a_symlink_is_not_read(tmp_path: Path) -> None:
    """The race a user could try while a sync runs: the file's folder becomes a link to the host's files."""
    outside = tmp_path / "outside"
    write(outside, "f.txt", "host")
    ws = tmp_path / "ws"
    write(ws, "d/f.txt", "mine")
    shutil.rmtree(ws / "d")
    os.symlink(str(outside), ws / "d")
    with pytest.raises(UnsafePath), open_file(ws, "d/f.txt"):
        pass


def test_a_change_inside_a_large_file_uploads_only_its_pieces(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    big = write(ws, "model.bin", os.urandom(80 * MiB + 12345))  # not a whole number of pieces
    engine = SyncEngine(store)
    cache = tmp_path / "cache.json.gz"
    first = engine.backup(ws, cache_path=cache)
    assert first.uploaded_bytes == big.stat().st_size
    st = big.stat()
    with open(big, "r+b") as f:  # 1 MiB rewritten in place, same size, mtime put back
        f.seek(10 * MiB)
        f.write(os.urandom(MiB))
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))

    report = engine.backup(ws, cache_path=cache)

    assert report.snapshot is not None and report.uploaded_files == 1
    assert report.uploaded_bytes <= 2 * 8 * MiB  # the one or two 8 MiB pieces the write touched
    [rec] = engine.manifest().files
    assert len(rec.chunks) == 11
    out = tmp_path / "out"
    out.mkdir()
    engine.restore(out)
    assert describe(out) == describe(ws)
    # And the earlier version is still whole.
    older = tmp_path / "older"
    older.mkdir()
    engine.restore(older, snapshot_id=first.snapshot)
    assert (older / "model.bin").read_bytes()[10 * MiB : 11 * MiB] != big.read_bytes()[10 * MiB : 11 * MiB]


def test_a_damaged_blob_is_refused_on_restore(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    write(ws, "a.txt", "the real content")
    engine = SyncEngine(store)
    engine.backup(ws)
    [rec] = engine.manifest().files
    store.put_bytes(blob_key(rec.sha256), b"something else")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StoreError, match="damaged"):
        engine.restore(out)
    assert list(out.iterdir()) == []


def test_retention_never_takes_a_blob_another_sync_just_uploaded(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    engine = SyncEngine(store, SyncPolicy(keep_snapshots=1))
    write(ws, "doc.txt", "version 1")
    engine.backup(ws)
    fresh = blob_key("f" * 64)
    store.put_bytes(fresh, b"uploaded by another sync, its snapshot not written yet")
    write(ws, "doc.txt", "version 2")

    report = engine.backup(ws)

    assert len(report.dropped_snapshots) == 1 and report.deleted_blobs == 1  # version 1's content
    assert fresh in {i.key for i in store.list(BLOB_PREFIX)}
    # The admin's clean-up, with no sync running, takes what no snapshot names.
    assert engine.collect_garbage() == 1
    assert fresh not in {i.key for i in store.list(BLOB_PREFIX)}
    out = tmp_path / "out"
    out.mkdir()
    engine.restore(out)
    assert (out / "doc.txt").read_text() == "version 2"


def test_folder_modes_round_trip(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    write(ws, ".ssh/id_ed25519", "key")
    write(ws, "shared/team.txt", "t")
    (ws / "private" / "empty").mkdir(parents=True)
    (ws / ".ssh").chmod(0o700)
    (ws / "shared").chmod(0o2775)  # setgid: a group's shared folder
    (ws / "private").chmod(0o750)
    engine = SyncEngine(store)
    engine.backup(ws)
    assert engine.manifest().dir_modes == {".ssh": 0o700, "shared": 0o2775, "private": 0o750, "private/empty": 0o755}

    out = tmp_path / "out"
    out.mkdir()
    engine.restore(out)

    modes = {d: stat.S_IMODE((out / d).stat().st_mode) for d in (".ssh", "shared", "private", "private/empty")}
    assert modes == {".ssh": 0o700, "shared": 0o2775, "private": 0o750, "private/empty": 0o755}
    # A mode change alone is a change: the next backup records it.
    (ws / ".ssh").chmod(0o755)
    assert engine.backup(ws).snapshot is not None
    assert engine.manifest().dir_modes[".ssh"] == 0o755


def test_a_restore_of_some_paths_sets_the_modes_of_the_folders_it_makes_only(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    write(ws, "a/b/f.txt", "f")
    (ws / "a").chmod(0o700)
    (ws / "a" / "b").chmod(0o711)
    engine = SyncEngine(store)
    engine.backup(ws)
    shutil.rmtree(ws / "a" / "b")
    (ws / "a").chmod(0o755)  # the user opened it up since

    engine.restore(ws, paths=["a/b/f.txt"])

    assert stat.S_IMODE((ws / "a").stat().st_mode) == 0o755  # there already: left as the user has it
    assert stat.S_IMODE((ws / "a" / "b").stat().st_mode) == 0o711  # made by the restore: as backed up


def test_a_manifest_without_folder_modes_still_restores(store: S3Store, tmp_path: Path) -> None:
    """Snapshots made before folder modes were recorded: read as they are, folders made 0755 as before."""
    ws = tmp_path / "ws"
    write(ws, "dir/file.txt", "old snapshot")
    (ws / "dir").chmod(0o700)
    engine = SyncEngine(store)
    sid = engine.backup(ws).snapshot
    assert sid is not None
    doc = json.loads(gzip.decompress(store.get_bytes(snapshot_key(sid))))
    del doc["dir_modes"]
    store.put_bytes(snapshot_key(sid), gzip.compress(json.dumps(doc).encode()))
    out = tmp_path / "out"
    out.mkdir()

    engine.restore(out)

    assert (out / "dir" / "file.txt").read_text() == "old snapshot"
    assert stat.S_IMODE((out / "dir").stat().st_mode) == 0o755
    # The first backup after the upgrade records the modes (a new snapshot, though no file changed).
    report = engine.backup(ws)
    assert report.snapshot is not None and report.uploaded_files == 0
    assert engine.manifest().dir_modes == {"dir": 0o700}


def test_names_that_are_not_utf8_round_trip(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    raw = os.fsencode(ws)
    os.makedirs(raw + b"/caf\xe9")
    with open(raw + b"/caf\xe9/men\xfc.txt", "wb") as f:
        f.write(b"latin-1 names")
    os.symlink(b"caf\xe9/men\xfc.txt", raw + b"/lien-\xff")
    write(ws, "plain.txt", "utf-8 neighbour")
    engine = SyncEngine(store)
    cache = tmp_path / "cache.json.gz"

    report = engine.backup(ws, cache_path=cache)

    assert report.skipped == [] and report.files == 2
    assert engine.backup(ws, cache_path=cache).snapshot is None  # the cache holds such names too
    out = tmp_path / "out"
    out.mkdir()
    engine.restore(out)
    assert describe(out) == describe(ws)
    assert sorted(os.listdir(os.fsencode(out))) == sorted(os.listdir(raw))
    assert os.readlink(os.fsencode(out) + b"/lien-\xff") == b"caf\xe9/men\xfc.txt"
    engine.restore(out, paths=[os.fsdecode(b"caf\xe9/men\xfc.txt")])  # a path of it can be named, too


def test_restore_into_a_sub_folder(store: S3Store, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    sample_workspace(ws)
    engine = SyncEngine(store)
    engine.backup(ws)
    out = tmp_path / "out"
    out.mkdir()

    engine.restore(out, into="old/copy")

    assert describe(out / "old" / "copy") == without(describe(ws), *EXCLUDED)
    with pytest.raises(UnsafePath):
        engine.restore(out, into="../escape")
    os.symlink(str(tmp_path), out / "link")
    with pytest.raises(UnsafePath):
        engine.restore(out, into="link/escape")
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(
    ("links", "leaving"),
    [
        ({"a/up": ".."}, set()),
        ({"a/up": "..", "chain": "a/up/../bob/x"}, {"chain"}),
        ({"a/up": "..", "ok": "a/up/a/up/x"}, set()),
        ({"a/up": "..", "twice": "a/up/a/up/.."}, {"twice"}),
        ({"a/b/up2": "../..", "x": "a/b/up2/.."}, {"x"}),
        ({"l1": "l2", "l2": "l1"}, {"l1", "l2"}),
        ({"self": "self/x"}, {"self"}),
        ({"abs": "/etc", "via": "abs/passwd"}, {"abs", "via"}),
        ({"d/in": "../d/x/../../d"}, set()),
        # The kernel follows 40 links at most: l20 -> ... -> l60 -> x is 41 of them (ELOOP), l21 -> ... is 40.
        ({f"l{i}": f"l{i + 1}" for i in range(60)} | {"l60": "x"}, {f"l{i}" for i in range(21)}),
    ],
    ids=["parent", "chain", "through-and-inside", "two-deep", "nested", "loop", "self", "absolute", "text", "41-deep"],
)
def test_links_are_judged_through_the_snapshots_own_links(links: dict[str, str], leaving: set[str]) -> None:
    assert leaving_links(links) == leaving
