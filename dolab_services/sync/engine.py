"""Backup and restore of one workspace to one :class:`~.store.ObjectStore`: incremental, content-addressed, crash-safe.

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
    - Change detection without reading: the local :class:`~.manifest.HashCache` (size, mtime, ctime, inode). No
      cache (a new machine) means hashing everything once; uploads still only happen for new contents.
    - Files are hashed and uploaded by a bounded thread pool, streamed (never held in memory). A file that changes
      while it is read is tried again, then left as it was in the previous snapshot, with a log line.

Workspace access goes through :mod:`.workspace` and :mod:`.dirfd`: a backup and a restore each open the workspace's
root once and reach everything below it by directory descriptors (``openat`` with ``O_NOFOLLOW``), never by
resolving a path again, so a user who swaps a folder for a symlink while the service (root) works gets a refusal,
never a read or a write outside the workspace.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from .dirfd import create_temp, make_symlink, open_parent, open_root, opened, walk
from .manifest import (
    BLOB_PREFIX,
    CHUNK_BYTES,
    CHUNK_THRESHOLD_BYTES,
    SNAPSHOT_PREFIX,
    FileRecord,
    HashCache,
    Manifest,
    blob_key,
    new_snapshot_id,
    snapshot_id_of,
    snapshot_key,
    snapshot_time,
)
from .selection import PathSelection
from .store import ObjectNotFound, ObjectStore, StoreError
from .workspace import (
    Excludes,
    LinkEntry,
    ScannedFile,
    UnsafePath,
    check_relpath,
    fd_path,
    open_file_at,
    scan,
)

__all__ = ["BackupReport", "RestoreReport", "SnapshotInfo", "SyncEngine", "SyncPolicy"]

log = logging.getLogger("dolab.sync")

#: ``progress(done_bytes, total_bytes)``, called from worker threads.
Progress = Callable[[int, int], None]

_READ_CHUNK = 1 << 20


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
            return self._backup(root_fd, cache_path, progress)

    def _backup(self, root_fd: int, cache_path: Path | None, progress: Progress | None) -> BackupReport:
        started = time.monotonic()
        snaps = self.snapshots()
        previous = self.manifest(snaps[-1].id) if snaps else None
        report = BackupReport(snapshot=None, previous=previous.snapshot if previous else None)
        scanned = scan(root_fd, self.policy.excludes)
        report.skipped = list(scanned.skipped)
        cache = HashCache(cache_path)
        known = {h for f in previous.files for h in f.blobs} if previous else set()
        prev_by_path = {f.path: f for f in previous.files} if previous else {}
        # Blobs a sync that died left behind are worth finding (one listing) only after such a death, or without
        # a cache; the marker says a sync with this cache began and did not finish.
        marker = cache_path.with_name(cache_path.name + ".incomplete") if cache_path is not None else None
        list_stored = marker is None or marker.exists() or not cache_path.exists()  # type: ignore[union-attr]
        if marker is not None:
            marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            marker.touch()

        records: dict[str, FileRecord] = {}
        new_cache: dict[str, tuple[int, int, int, int, str]] = {}
        todo: list[ScannedFile] = []
        for f in scanned.files:
            sha = cache.lookup(f.path, f.size, f.mtime_ns, f.ctime_ns, f.ino)
            prev = prev_by_path.get(f.path)
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

        uploader = _Uploader(self.store, root_fd, known, sum(f.size for f in todo), progress)
        if todo:
            with (
                ThreadPoolExecutor(max(1, self.policy.workers), thread_name_prefix="dolab-sync") as pool,
                tempfile.TemporaryDirectory(prefix="dolab-sync-") as pieces,
            ):
                uploader.pieces_dir = Path(pieces)
                # Listed while the first files are hashed; uploads wait for it.
                listing = pool.submit(uploader.list_stored if list_stored else uploader.listed.set)
                futures: dict[Future, ScannedFile] = {pool.submit(uploader.process, f): f for f in todo}
                done, _ = wait([listing, *futures], return_when=FIRST_EXCEPTION)
                failed = next((fut for fut in done if fut.exception() is not None), None)
                if failed is not None:
                    uploader.cancelled = True
                    for fut in futures:
                        fut.cancel()
                    raise failed.exception()  # type: ignore[misc]
                for fut, f in futures.items():
                    result = fut.result()
                    if isinstance(result, str):  # vanished or kept changing: keep the old version if any
                        report.skipped.append((f.path, result))
                        if f.path in prev_by_path:
                            records[f.path] = prev_by_path[f.path]
                        continue
                    rec, cache_entry = result
                    records[f.path] = rec
                    new_cache[f.path] = cache_entry
        report.hashed_files = uploader.hashed
        report.uploaded_files, report.uploaded_bytes = uploader.uploaded, uploader.uploaded_bytes

        dir_modes = dict(scanned.dir_modes)
        if self.policy.deletions == "keep" and previous is not None:
            self._carry_deleted(previous, records, scanned.empty_dirs, {link.path for link in scanned.links})
            self._carry_dir_modes(previous, records, {f.path for f in scanned.files}, dir_modes)
        manifest = Manifest(
            snapshot="",
            files=sorted(records.values(), key=lambda r: r.path),
            links=sorted(scanned.links, key=lambda link: link.path),
            dirs=sorted(scanned.empty_dirs),
            dir_modes=dir_modes,
        )
        report.files, report.total_bytes = len(manifest.files), manifest.total_bytes
        if not manifest.same_content(previous):
            manifest.snapshot = self._unused_id({s.id for s in snaps})
            # Last: only now does the snapshot exist.
            self.store.put_bytes(snapshot_key(manifest.snapshot), manifest.to_bytes())
            report.snapshot = manifest.snapshot
            snaps.append(SnapshotInfo(manifest.snapshot, snapshot_time(manifest.snapshot)))
            log.info(
                "Snapshot %s of %s: %d files, %d bytes; uploaded %d files, %d bytes",
                manifest.snapshot,
                self.store.description,
                report.files,
                report.total_bytes,
                report.uploaded_files,
                report.uploaded_bytes,
            )
        cache.save(new_cache)
        if marker is not None:
            marker.unlink(missing_ok=True)
        report.dropped_snapshots, report.deleted_blobs = self._retain(snaps)
        report.seconds = time.monotonic() - started
        return report

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
        files, links, dirs = manifest.files, manifest.links, manifest.dirs
        if paths is not None:
            selection = PathSelection(paths)  # bounded; each entry costs its depth, not the number of paths
            files = [f for f in files if selection.selects(f.path)]
            links = [link for link in links if selection.selects(link.path)]
            dirs = [d for d in dirs if selection.selects(d)]
            if not (files or links or dirs):
                raise ObjectNotFound(f"The restore point {manifest.snapshot} holds nothing at {selection}.")
        report = RestoreReport(manifest.snapshot)
        total = sum(f.size for f in files)
        done = [0]
        lock = threading.Lock()

        def one(rec: FileRecord) -> None:
            _restore_file(self.store, place, rec, pieces_dir)
            with lock:
                done[0] += rec.size
                report.files += 1
                report.bytes += rec.size
                if progress is not None:
                    progress(done[0], total)

        with _Destination(dest, into) as place:
            for d in dirs:
                place.make_dir(d)
            with (
                ThreadPoolExecutor(max(1, self.policy.workers), thread_name_prefix="dolab-restore") as pool,
                tempfile.TemporaryDirectory(prefix="dolab-restore-") as pieces,
            ):
                pieces_dir = Path(pieces)
                for fut in [pool.submit(one, f) for f in files]:
                    fut.result()
            for link in links:
                if place.make_link(link):
                    report.links += 1
                else:
                    log.warning("Restore keeps the folder %r where the backup has a link", link.path)
            place.set_dir_modes(manifest.dir_modes, every=paths is None)
        log.info(
            "Restored %d files (%d bytes) of snapshot %s into %s%s",
            report.files,
            report.bytes,
            manifest.snapshot,
            dest,
            f"/{into}" if into else "",
        )
        return report


class _Destination:
    """Where a restore writes: the folder ``into`` below the workspace root ``root``, held open by a descriptor
    for the whole restore; every folder below is reached from it by :mod:`.dirfd` (made when missing, given the
    root's owner when the service is root), so nothing is ever resolved by path again."""

    def __init__(self, root: Path, into: str) -> None:
        if into:
            check_relpath(into)
        with opened(open_root(root)) as root_fd:
            st = os.fstat(root_fd)
            self.owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
            self.fd = walk(root_fd, into, create=True, owner=self.owner)
        self._made: set[str] = set()  # folders this restore made (relative to ``into``)
        self._lock = threading.Lock()

    def __enter__(self) -> _Destination:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def _note(self, relpath: str) -> None:
        with self._lock:
            self._made.add(relpath)

    def parent(self, relpath: str) -> tuple[int, str]:
        """A new descriptor of ``relpath``'s folder (made when missing), and its last name."""
        check_relpath(relpath)
        return open_parent(self.fd, relpath, create=True, owner=self.owner, made=self._note)

    def make_dir(self, relpath: str) -> None:
        """Make the folder ``relpath`` and those above it."""
        check_relpath(relpath)
        os.close(walk(self.fd, relpath, create=True, owner=self.owner, made=self._note))

    def make_link(self, link: LinkEntry) -> bool:
        """Make the symlink (replacing a file or link there); False when a folder is in its place."""
        dir_fd, name = self.parent(link.path)
        with opened(dir_fd):
            return make_symlink(dir_fd, name, link.target, self.owner)

    def set_dir_modes(self, modes: dict[str, int], every: bool) -> None:
        """Give folders their backed-up mode: ``every`` one, or those this restore made. Last, so that a folder
        backed up read-only is written into first."""
        for relpath, mode in modes.items():
            if not (every or relpath in self._made):
                continue
            try:
                fd = walk(self.fd, relpath)
            except (FileNotFoundError, NotADirectoryError, UnsafePath):
                continue  # not restored (excluded since), or replaced by the user meanwhile
            with opened(fd):
                os.fchmod(fd, mode)


def _restore_file(store: ObjectStore, place: _Destination, rec: FileRecord, pieces_dir: Path) -> None:
    """Download one file next to its place under a random name, check its hash, then rename it over the place
    (which replaces a symlink planted there, never writes through it)."""
    dfd, name = place.parent(rec.path)
    with opened(dfd):
        fd, tmp = create_temp(dfd)
        try:
            try:
                if rec.chunks:
                    for index, piece in enumerate(rec.chunks):
                        _get_piece(store, piece, fd, index * CHUNK_BYTES, pieces_dir)
                else:
                    store.get_file(blob_key(rec.sha256), fd_path(fd))
            except ObjectNotFound:
                raise StoreError(
                    f"The backup of {rec.path} is missing its content; restore it from another restore point."
                ) from None
            if _hash_fd(fd) != rec.sha256 or os.fstat(fd).st_size != rec.size:
                raise StoreError(f"The backup of {rec.path} is damaged; restore it from another restore point.")
            os.fchmod(fd, rec.mode)
            if place.owner is not None:
                os.fchown(fd, *place.owner)
            os.utime(fd, ns=(rec.mtime_ns, rec.mtime_ns))
            try:
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except IsADirectoryError:
                raise UnsafePath(
                    f"There is a folder at {rec.path}, where the backup has a file: move it away, then restore again."
                ) from None
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)


class _BlobWriter:
    r"""What a backup's pool threads share: the contents the store holds (``known``), those being uploaded now
    (``claimed``, so two files with one content upload it once), the counts, and the progress. A worker hashes a
    file it holds open, :meth:`claim`\ s the pieces the store lacks, :meth:`put`\ s them, then :meth:`account`\ s
    for it."""

    def __init__(self, store: ObjectStore, known: set[str], total_bytes: int, progress: Progress | None) -> None:
        self.store = store
        self.known = set(known)
        self.claimed: set[str] = set()
        self.lock = threading.Lock()
        self.total_bytes = total_bytes
        self.progress = progress
        self.done_bytes = 0
        self.hashed = self.uploaded = self.uploaded_bytes = 0
        self.cancelled = False
        #: Where a large file's pieces are copied before their upload (a private folder of the sync's).
        self.pieces_dir = Path(tempfile.gettempdir())

    def claim(self, sha: str, chunks: tuple[str, ...]) -> list[str]:
        """The content's pieces (its whole hash when it has none) that no one has stored or is uploading: now
        this worker's to upload."""
        pieces = list(dict.fromkeys(chunks or (sha,)))
        with self.lock:
            self.hashed += 1
            upload = [h for h in pieces if h not in self.known and h not in self.claimed]
            self.claimed.update(upload)
        return upload

    def release(self, upload: list[str]) -> None:
        """Give claimed pieces back (their upload failed or was dropped)."""
        with self.lock:
            self.claimed.difference_update(upload)

    def put(self, fd: int, sha: str, chunks: tuple[str, ...], upload: list[str]) -> None:
        """Upload the claimed pieces of the content open at ``fd``; a failure gives them back and propagates."""
        try:
            for h in upload:
                if chunks:
                    self._put_piece(fd, h, chunks.index(h))
                else:
                    self.store.put_file(blob_key(sha), fd_path(fd))
        except BaseException:
            self.release(upload)
            raise

    def account(self, size: int, listed_size: int, chunks: tuple[str, ...], upload: list[str]) -> None:
        """Count a file done: ``size`` bytes as read, ``listed_size`` as the scan saw it (for the progress)."""
        with self.lock:
            if upload:
                self.known.update(upload)
                self.uploaded += 1
                self.uploaded_bytes += (
                    size if not chunks else sum(min(CHUNK_BYTES, size - chunks.index(h) * CHUNK_BYTES) for h in upload)
                )
            self.done_bytes += listed_size
            if self.progress is not None:
                self.progress(self.done_bytes, self.total_bytes)

    def _put_piece(self, fd: int, sha: str, index: int) -> None:
        """Upload piece ``index`` of a large file: copied (in the kernel) to a private temporary file first."""
        tmp_fd, tmp = tempfile.mkstemp(dir=self.pieces_dir)
        try:
            _copy_range(fd, tmp_fd, index * CHUNK_BYTES, 0, CHUNK_BYTES)
            self.store.put_file(blob_key(sha), Path(tmp))
        finally:
            os.close(tmp_fd)
            os.unlink(tmp)


class _Uploader(_BlobWriter):
    """Hashes changed files of the workspace and uploads contents the store does not have yet."""

    def __init__(
        self, store: ObjectStore, root_fd: int, known: set[str], total_bytes: int, progress: Progress | None
    ) -> None:
        super().__init__(store, known, total_bytes, progress)
        self.root_fd = root_fd  # the workspace's root, open for the whole backup
        self.listed = threading.Event()

    def list_stored(self) -> None:
        """Add every blob the store holds to the known ones (uploads wait for this)."""
        try:
            stored = {info.key.rsplit("/", 1)[-1] for info in self.store.list(BLOB_PREFIX)}
            with self.lock:
                self.known |= stored
        finally:
            self.listed.set()

    def process(self, f: ScannedFile) -> tuple[FileRecord, tuple[int, int, int, int, str]] | str:
        """The file's record and cache entry, or why it was left out (a sentence)."""
        for _attempt in range(3):
            if self.cancelled:
                return "cancelled"
            try:
                with open_file_at(self.root_fd, f.path) as fd:
                    before = os.fstat(fd)
                    sha, chunks = _hash_content(fd, before.st_size)
                    self.listed.wait()
                    upload = self.claim(sha, chunks)
                    self.put(fd, sha, chunks, upload)
                    after = os.fstat(fd)
            except FileNotFoundError:
                return "it was deleted during the sync"
            except UnsafePath as e:
                log.warning("Sync refuses %s: %s", f.path, e)
                return str(e)
            ident = (after.st_size, after.st_mtime_ns, after.st_ctime_ns)
            if ident != (before.st_size, before.st_mtime_ns, before.st_ctime_ns):
                # Written while we read it: the blob may not match its name. Remove it and read again.
                if upload:
                    self.store.delete(blob_key(h) for h in upload)
                    self.release(upload)
                continue
            self.account(after.st_size, f.size, chunks, upload)
            mode = after.st_mode & 0o777
            return (
                FileRecord(f.path, after.st_size, after.st_mtime_ns, mode, sha, chunks),
                (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino, sha),
            )
        log.warning("Sync leaves %s as it was: it kept changing while being read", f.path)
        return "it kept changing while being read"


def _hash_content(fd: int, size: int) -> tuple[str, tuple[str, ...]]:
    """The content's hash, and its pieces' hashes when it is large enough to be stored in pieces."""
    return _hash_pieces(fd) if size >= CHUNK_THRESHOLD_BYTES else (_hash_fd(fd), ())


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    """Copy up to ``count`` bytes between descriptors (stops at the source's end)."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, count, src_offset, dst_offset)
        except OSError:  # a file system without it: through a small buffer
            data = os.pread(src, min(count, _READ_CHUNK), src_offset)
            n = os.pwrite(dst, data, dst_offset) if data else 0
        if n == 0:
            return
        src_offset, dst_offset, count = src_offset + n, dst_offset + n, count - n


def _get_piece(store: ObjectStore, sha: str, fd: int, offset: int, pieces_dir: Path) -> None:
    """Download one piece of a large file and write it at ``offset`` of ``fd``."""
    tmp_fd, tmp = tempfile.mkstemp(dir=pieces_dir)
    try:
        store.get_file(blob_key(sha), fd_path(tmp_fd))
        _copy_range(tmp_fd, fd, 0, offset, os.fstat(tmp_fd).st_size)
    finally:
        os.close(tmp_fd)
        os.unlink(tmp)


def _hash_pieces(fd: int) -> tuple[str, tuple[str, ...]]:
    """The whole content's hash and each CHUNK_BYTES piece's, in one read."""
    whole = hashlib.sha256()
    pieces = []
    offset = 0
    while True:
        piece = hashlib.sha256()
        end = offset + CHUNK_BYTES
        while offset < end:
            data = os.pread(fd, min(_READ_CHUNK, end - offset), offset)
            if not data:
                break
            whole.update(data)
            piece.update(data)
            offset += len(data)
        if offset > end - CHUNK_BYTES:  # this piece has bytes (a whole one, or the last, shorter one)
            pieces.append(piece.hexdigest())
        if offset < end:
            return whole.hexdigest(), tuple(pieces)


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, _READ_CHUNK, offset)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)
        offset += len(chunk)
