"""Backup and restore of one workspace to one :class:`~.store.ObjectStore`: incremental, content-addressed, crash-safe.

:class:`SyncEngine` runs the steps every backup and restore share, whatever the files' side: a workspace on this
machine (:mod:`.local`, :meth:`SyncEngine.backup` and :meth:`SyncEngine.restore`) or one in a running Jupyter
server reached through its contents API (:mod:`.remote`). A side is a :class:`BackupSource` (list the files, tell
a file known unchanged, read a changed one) and a :class:`RestoreDestination` (make folders, write a file, finish);
what is stored and how (:mod:`.blobs`, :mod:`.manifest`) does not depend on it.

Design
    - File contents are immutable blobs named by their SHA-256 (``blobs/ab/ab12...``): a file that did not change,
      or was renamed or copied, is never uploaded again, and a blob is never overwritten with other content.
    - A snapshot is one manifest object (``snapshots/<utc id>.json.gz``, see :mod:`.manifest`) written **last**,
      after every blob it names is stored. A sync that dies halfway leaves extra blobs and no manifest: every
      earlier snapshot stays whole, and the next sync reuses the blobs it finds in use.
    - A run that finds the same tree as the latest snapshot writes nothing at all.
    - Restore points: the last ``keep_snapshots`` snapshots are kept; older manifests are deleted with the blobs
      only they named. Blobs no snapshot names (left by a sync that died and not reused) go with
      :meth:`SyncEngine.collect_garbage`, run when no sync of the workspace is.
    - Deletions: ``mirror`` (a snapshot is the workspace as it is; deleted files live on in older snapshots) or
      ``keep`` (files deleted from the workspace are carried into every new snapshot).
    - Change detection without reading: the local :class:`~.manifest.HashCache`. No cache (a new machine) means
      reading everything once; uploads still only happen for new contents.
    - Files are read, hashed and uploaded by a bounded thread pool, streamed (never held in memory). A file a side
      could not read (gone, refused, changing) is left as it was in the previous snapshot, with a log line.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from .blobs import BlobWriter, Progress, fetch_verified
from .dirfd import open_root, opened
from .local import LocalDestination, LocalSource
from .manifest import (
    BLOB_PREFIX,
    CHUNK_THRESHOLD_BYTES,
    SNAPSHOT_PREFIX,
    CacheEntry,
    FileRecord,
    HashCache,
    Manifest,
    blob_key,
    new_snapshot_id,
    snapshot_id_of,
    snapshot_key,
    snapshot_time,
)
from .store import ObjectNotFound, ObjectStore
from .workspace import Excludes, ScannedFile, ScanResult

__all__ = [
    "BackupReport",
    "BackupSource",
    "RestoreDestination",
    "RestoreReport",
    "SnapshotInfo",
    "SyncEngine",
    "SyncPolicy",
]

log = logging.getLogger("dolab.sync")


@dataclass(frozen=True)
class SyncPolicy:
    """How backups are made and kept."""

    keep_snapshots: int = 10
    deletions: Literal["mirror", "keep"] = "mirror"
    excludes: Excludes = field(default_factory=Excludes)
    workers: int = 8


@dataclass
class BackupReport:
    """What one backup did. ``snapshot`` is the new snapshot's id, or None when nothing had changed."""

    snapshot: str | None
    previous: str | None
    files: int = 0
    total_bytes: int = 0
    hashed_files: int = 0
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dropped_snapshots: list[str] = field(default_factory=list)
    deleted_blobs: int = 0
    seconds: float = 0.0


@dataclass
class RestoreReport:
    """What one restore wrote."""

    snapshot: str
    files: int = 0
    bytes: int = 0
    links: int = 0


@dataclass(frozen=True)
class SnapshotInfo:
    """A restore point."""

    id: str
    created: datetime | None


class BackupSource(Protocol):
    """Where a backup reads files from (:class:`~.local.LocalSource`, :class:`~.remote.RemoteSource`)."""

    #: Names the backup's threads and its private temporary folder.
    thread_prefix: str
    #: Whether every backup that reads files lists the store's blobs first; else only one without a hash cache, or
    #: after a backup with this cache that died (the cache's ``.incomplete`` marker says so).
    always_lists_store: bool
    #: Whether the scan sees folders' modes (``keep`` then carries those of gone folders that still hold files).
    sees_dir_modes: bool

    def scan(self, excludes: Excludes) -> ScanResult:
        """Every file, link, empty folder (and folder mode) to back up, and what was skipped."""
        ...

    def known_hash(self, f: ScannedFile, cache: HashCache, previous: FileRecord | None) -> str | None:
        """The content hash of ``f`` when it is known not to have changed (``previous``: its latest record)."""
        ...

    def check_changed(self, todo: list[ScannedFile]) -> None:
        """Refuse, with a sentence, to read these changed files (for instance, more than a backup may read)."""
        ...

    def read(self, f: ScannedFile, writer: BlobWriter) -> tuple[FileRecord, CacheEntry] | str:
        """Read one changed file and store its content through ``writer`` (called on the backup's threads): its
        record and hash cache entry, or why it was left out (a sentence)."""
        ...

    def snapshot_written(self, report: BackupReport, store_description: str) -> None:
        """Log the snapshot this backup wrote."""
        ...


class RestoreDestination(Protocol):
    """Where a restore writes files to (:class:`~.local.LocalDestination`, :class:`~.remote.RemoteDestination`)."""

    #: Names the restore's threads and its private temporary folder.
    thread_prefix: str
    #: Where the files go, for the log.
    description: str
    #: Whether a file that fails lets every other file be written before the failure is raised (else the files
    #: not begun yet are dropped).
    finishes_after_a_failure: bool

    def prepare(self, manifest: Manifest) -> list[FileRecord]:
        """Make the folders the restore needs; the files to write."""
        ...

    def write_file(self, rec: FileRecord, fetch: Callable[[int], None], scratch: Path) -> bool:
        """Write one file, whose checked content ``fetch`` puts into an empty file's descriptor (``scratch``: a
        private folder); False when the file was skipped (with a log line)."""
        ...

    def finish(self, manifest: Manifest, report: RestoreReport) -> None:
        """What comes after the files (links, folders' modes, a hash cache)."""
        ...


class SyncEngine:
    """Back up a workspace to ``store``, list its snapshots, restore them, keep the last N."""

    def __init__(self, store: ObjectStore, policy: SyncPolicy | None = None) -> None:
        self.store = store
        self.policy = policy or SyncPolicy()

    # ----- snapshots -----------------------------------------------------------------------------------

    def snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot in the store, oldest first."""
        ids = sorted(sid for sid in (snapshot_id_of(i.key) for i in self.store.list(SNAPSHOT_PREFIX)) if sid)
        return [SnapshotInfo(sid, snapshot_time(sid)) for sid in ids]

    def manifest(self, snapshot_id: str | None = None) -> Manifest:
        """A snapshot's manifest (the latest when ``snapshot_id`` is None); StoreError when there is none."""
        if snapshot_id is None:
            snaps = self.snapshots()
            if not snaps:
                raise ObjectNotFound(f"There is no backup yet in {self.store.description}.")
            snapshot_id = snaps[-1].id
        if (
            snapshot_id_of(snapshot_key(snapshot_id)) != snapshot_id
            or not snapshot_id.replace("T", "").rstrip("Z").isdigit()
        ):
            raise ObjectNotFound(f"There is no restore point {snapshot_id!r}.")
        try:
            return Manifest.from_bytes(self.store.get_bytes(snapshot_key(snapshot_id)))
        except ObjectNotFound:
            raise ObjectNotFound(f"There is no restore point {snapshot_id!r}.") from None

    # ----- backup --------------------------------------------------------------------------------------

    def backup(self, workspace: Path, cache_path: Path | None = None, progress: Progress | None = None) -> BackupReport:
        """Make a snapshot of ``workspace`` if anything changed since the latest one; then apply retention."""
        with opened(open_root(workspace)) as root_fd:
            return self.backup_from(LocalSource(root_fd), cache_path, progress)

    def backup_from(
        self, source: BackupSource, cache_path: Path | None = None, progress: Progress | None = None
    ) -> BackupReport:
        """Make a snapshot of what ``source`` lists if anything changed since the latest one; then apply retention.

        The hash cache at ``cache_path`` tells which files need not be read again. A failure (of the source or the
        store) raises before the snapshot is written: every earlier one stays whole.
        """
        started = time.monotonic()
        snaps = self.snapshots()
        previous = self.manifest(snaps[-1].id) if snaps else None
        report = BackupReport(snapshot=None, previous=previous.snapshot if previous else None)
        scanned = source.scan(self.policy.excludes)
        report.skipped = list(scanned.skipped)
        cache = HashCache(cache_path)
        prev_by_path = {f.path: f for f in previous.files} if previous else {}
        # Blobs a sync that died left behind are worth finding (one listing) only after such a death, or without
        # a cache; the marker says a sync with this cache began and did not finish.
        marker = None if source.always_lists_store else _unfinished_marker(cache_path)
        list_stored = marker is None or marker.exists() or cache_path is None or not cache_path.exists()
        if marker is not None:
            marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            marker.touch()

        records: dict[str, FileRecord] = {}
        new_cache: dict[str, CacheEntry] = {}
        todo: list[ScannedFile] = []
        for f in scanned.files:
            prev = prev_by_path.get(f.path)
            sha = source.known_hash(f, cache, prev)
            chunks: tuple[str, ...] = ()
            if sha is not None and f.size >= CHUNK_THRESHOLD_BYTES:
                # A large file's pieces come from the previous snapshot (the cache keeps whole hashes only).
                chunks = prev.chunks if prev is not None and prev.sha256 == sha else ()
                sha = sha if chunks else None
            if sha is not None:
                records[f.path] = FileRecord(f.path, f.size, f.mtime_ns, f.mode, sha, chunks)
                new_cache[f.path] = (f.size, f.mtime_ns, f.ctime_ns, f.ino, sha)
            else:
                todo.append(f)
        if todo:
            source.check_changed(todo)
            known = {h for f in previous.files for h in f.blobs} if previous else set()
            writer = BlobWriter(self.store, known, sum(f.size for f in todo), progress)
            self._read_changed(source, writer, todo, list_stored, report, records, new_cache, prev_by_path)

        self._write_snapshot(source, scanned, previous, records, snaps, report)
        cache.save(new_cache)
        if marker is not None:
            marker.unlink(missing_ok=True)
        report.dropped_snapshots, report.deleted_blobs = self._retain(snaps)
        report.seconds = time.monotonic() - started
        return report

    def _read_changed(
        self,
        source: BackupSource,
        writer: BlobWriter,
        todo: list[ScannedFile],
        list_stored: bool,
        report: BackupReport,
        records: dict[str, FileRecord],
        new_cache: dict[str, CacheEntry],
        prev_by_path: dict[str, FileRecord],
    ) -> None:
        """Read the changed files on the pool, storing contents the store lacks; a file that could not be read
        keeps its previous record. The first failure cancels what has not begun and is raised."""
        with (
            ThreadPoolExecutor(max(1, self.policy.workers), thread_name_prefix=source.thread_prefix) as pool,
            tempfile.TemporaryDirectory(prefix=source.thread_prefix + "-") as pieces,
        ):
            writer.pieces_dir = Path(pieces)
            # Listed while the first files are read; uploads wait for it.
            listing = pool.submit(writer.list_stored if list_stored else writer.listed.set)
            futures: dict[Future, ScannedFile] = {pool.submit(source.read, f, writer): f for f in todo}
            done, _ = wait([listing, *futures], return_when=FIRST_EXCEPTION)
            failed = next((fut for fut in done if fut.exception() is not None), None)
            if failed is not None:
                writer.cancelled = True
                for fut in futures:
                    fut.cancel()
                raise failed.exception()  # type: ignore[misc]
            for fut, f in futures.items():
                result = fut.result()
                if isinstance(result, str):  # vanished, refused or kept changing: keep the old version if any
                    report.skipped.append((f.path, result))
                    if f.path in prev_by_path:
                        records[f.path] = prev_by_path[f.path]
                    continue
                records[f.path], new_cache[f.path] = result
        report.hashed_files = writer.hashed
        report.uploaded_files, report.uploaded_bytes = writer.uploaded, writer.uploaded_bytes

    def _write_snapshot(
        self,
        source: BackupSource,
        scanned: ScanResult,
        previous: Manifest | None,
        records: dict[str, FileRecord],
        snaps: list[SnapshotInfo],
        report: BackupReport,
    ) -> None:
        """Write the new snapshot's manifest, unless it holds what the latest one does (``snaps`` gains it)."""
        dir_modes = dict(scanned.dir_modes)
        if self.policy.deletions == "keep" and previous is not None:
            self._carry_deleted(previous, records, scanned.empty_dirs, {link.path for link in scanned.links})
            if source.sees_dir_modes:
                self._carry_dir_modes(previous, records, {f.path for f in scanned.files}, dir_modes)
        manifest = Manifest(
            snapshot="",
            files=sorted(records.values(), key=lambda r: r.path),
            links=sorted(scanned.links, key=lambda link: link.path),
            dirs=sorted(scanned.empty_dirs),
            dir_modes=dir_modes,
        )
        report.files, report.total_bytes = len(manifest.files), manifest.total_bytes
        if manifest.same_content(previous):
            return
        manifest.snapshot = self._unused_id({s.id for s in snaps})
        # Last: only now does the snapshot exist.
        self.store.put_bytes(snapshot_key(manifest.snapshot), manifest.to_bytes())
        report.snapshot = manifest.snapshot
        snaps.append(SnapshotInfo(manifest.snapshot, snapshot_time(manifest.snapshot)))
        source.snapshot_written(report, self.store.description)

    @staticmethod
    def _unused_id(taken: set[str]) -> str:
        sid = new_snapshot_id()
        while sid in taken:  # two syncs in the same microsecond, or a clock that went back
            time.sleep(0.001)
            sid = new_snapshot_id()
        return sid

    @staticmethod
    def _carry_deleted(previous: Manifest, records: dict[str, FileRecord], dirs: list[str], links: set[str]) -> None:
        present = set(records) | links
        prefixes = {p.rsplit("/", 1)[0] for p in present if "/" in p} | set(dirs)
        for rec in previous.files:
            if rec.path in present:
                continue
            # A path now taken by a folder (or a file where a folder was) cannot come back as it was.
            parents = {rec.path.rsplit("/", i)[0] for i in range(1, rec.path.count("/") + 1)}
            if rec.path in prefixes or parents & present:
                continue
            records[rec.path] = rec

    @staticmethod
    def _carry_dir_modes(previous: Manifest, records: dict[str, FileRecord], present: set[str], modes: dict) -> None:
        """The modes of the gone folders that carried files (``keep``) come back in."""
        for path in records:
            if path in present:
                continue
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                folder = "/".join(parts[:i])
                if folder not in modes and folder in previous.dir_modes:
                    modes[folder] = previous.dir_modes[folder]

    # ----- retention -----------------------------------------------------------------------------------

    def _retain(self, snaps: list[SnapshotInfo]) -> tuple[list[str], int]:
        keep = max(1, self.policy.keep_snapshots)
        if len(snaps) <= keep:
            return [], 0
        dropped = [s.id for s in snaps[:-keep]]
        # Only blobs the dropped snapshots named and no kept one does: a blob another sync of the same workspace
        # (another process) uploaded a moment ago for its coming snapshot is never among them.
        gone = self._blobs_of(dropped) - self._blobs_of(s.id for s in snaps[-keep:])
        self.store.delete(snapshot_key(sid) for sid in dropped)
        self.store.delete(blob_key(h) for h in sorted(gone))
        log.info("Dropped %d old snapshot(s) of %s, %d unused blob(s)", len(dropped), self.store.description, len(gone))
        return dropped, len(gone)

    def _blobs_of(self, snapshot_ids: Iterable[str]) -> set[str]:
        blobs: set[str] = set()
        for sid in snapshot_ids:
            try:
                blobs.update(h for f in self.manifest(sid).files for h in f.blobs)
            except ObjectNotFound:
                pass  # dropped meanwhile by another sync
        return blobs

    def collect_garbage(self) -> int:
        """Delete every blob no snapshot names, such as those a sync that died left behind (an admin's clean-up:
        run it when no sync of this workspace is running, since it would take a running sync's fresh uploads)."""
        live = self._blobs_of(s.id for s in self.snapshots())
        dead = [i.key for i in self.store.list(BLOB_PREFIX) if i.key.rsplit("/", 1)[-1] not in live]
        self.store.delete(dead)
        return len(dead)

    # ----- restore -------------------------------------------------------------------------------------

    def restore(
        self,
        dest: Path,
        snapshot_id: str | None = None,
        paths: Iterable[str] | None = None,
        progress: Progress | None = None,
        into: str = "",
    ) -> RestoreReport:
        """Write a snapshot (the latest by default), or only ``paths`` of it (files, or folders and all below),
        into the directory ``dest`` (a workspace's root), or into its sub-folder ``into`` (made when missing).
        Existing files are replaced; nothing else is touched, but folders' modes: a whole restore gives every
        folder the mode it was backed up with, a restore of some paths those it makes.

        Everything is reached from one descriptor of ``dest`` by descriptors (:mod:`.dirfd`), so a folder that
        becomes a symlink meanwhile is refused, never written through. Raises StoreError (ObjectNotFound for a
        missing snapshot or a path the snapshot does not hold) and UnsafePath for a path that is not clean or goes
        through a symlink (or a folder where the backup has a file).
        """
        manifest = self.manifest(snapshot_id)
        with LocalDestination(dest, into, paths) as place:
            return self.restore_to(place, manifest, progress)

    def restore_to(
        self, destination: RestoreDestination, manifest: Manifest, progress: Progress | None = None
    ) -> RestoreReport:
        """Write the snapshot ``manifest`` to ``destination``: its folders, then each file, downloaded and checked
        against its hash on the pool, then what comes last. Raises the first failure (StoreError for a content
        missing or damaged)."""
        files = destination.prepare(manifest)
        report = RestoreReport(manifest.snapshot)
        total = sum(f.size for f in files)
        lock = threading.Lock()

        def one(rec: FileRecord, scratch: Path) -> None:
            if not destination.write_file(rec, lambda fd: fetch_verified(self.store, rec, fd, scratch), scratch):
                return
            with lock:
                report.files += 1
                report.bytes += rec.size
                if progress is not None:
                    progress(report.bytes, total)

        prefix = destination.thread_prefix
        with (
            ThreadPoolExecutor(max(1, self.policy.workers), thread_name_prefix=prefix) as pool,
            tempfile.TemporaryDirectory(prefix=prefix + "-") as scratch,
        ):
            futures = [pool.submit(one, f, Path(scratch)) for f in files]
            if destination.finishes_after_a_failure:
                for fut in futures:
                    fut.result()
            else:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = next((fut for fut in done if fut.exception() is not None), None)
                if failed is not None:
                    for fut in futures:
                        fut.cancel()
                    raise failed.exception()  # type: ignore[misc]
        destination.finish(manifest, report)
        log.info(
            "Restored %d files (%d bytes) of snapshot %s into %s",
            report.files,
            report.bytes,
            manifest.snapshot,
            destination.description,
        )
        return report


def _unfinished_marker(cache_path: Path | None) -> Path | None:
    """The file that says a backup with the hash cache at ``cache_path`` began and did not finish."""
    return cache_path.with_name(cache_path.name + ".incomplete") if cache_path is not None else None
