"""Backup and restore of a workspace that lives in a running Jupyter server elsewhere (a RunPod pod), through that
server's REST API (:mod:`.contents`). No storage credential ever goes to the server: the hub (or the sync service)
reads the files through the API and writes the blobs to the store itself.

:class:`RemoteSource` and :class:`RemoteDestination` are the server's side of the steps
:class:`~.engine.SyncEngine` runs for every backup and restore; :func:`backup_remote` and :func:`restore_remote`
run them. The snapshot is a normal manifest (:mod:`.manifest`) of the same blobs and pieces a local backup writes,
so remote and local backups are the same kind of snapshot: restore points, the service API and ``dolab backups``
work the same for both.

Reading (backup)
    The tree is listed with ``GET api/contents/<dir>`` (names, types, sizes, ``last_modified``; the local scan's
    excludes, size cap and path checks apply); each changed file is downloaded from ``GET files/<path>`` into a
    private temporary file (never whole in memory), hashed, and its contents the store lacks uploaded. What the API
    hides (hidden files, unless the server allows them) is not backed up; a symlink inside the workspace is backed
    up as a copy, one leading out is refused by the server and skipped; files are recorded 0644 (0444 when not
    writable). A file that grows while it is read is read again, then skipped; a backup whose changed files weigh
    more than ``max_read_bytes`` fails with a sentence before reading any.

Change detection
    A file is downloaded again unless its ``(size, last_modified)`` matches the local hash cache (kept by the
    caller, ``ctime`` and inode fields 0) or the latest snapshot's record. The API gives no ``ctime``: a file rewritten
    with the same size and then given back its old mtime (``touch -d``, ``cp -p`` over it, ``tar x``) is **not** seen
    as changed remotely, unlike a local workspace. Every write through Jupyter, a kernel or a shell moves the mtime.

Writing (restore)
    Folders first, then files through ``PUT api/contents/<path>``; times and modes cannot be set through the API,
    and symlinks cannot be made: they are skipped with a log line, and so are paths the server refuses and names
    that are not UTF-8. The hash cache is filled from the replies, so the first backup after a restore downloads
    nothing.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from .blobs import BlobWriter, Progress, hash_content
from .contents import Oversized, PathRefused, RemoteError, RemoteServer, parse_time_ns
from .engine import BackupReport, RestoreReport, SyncEngine
from .manifest import CacheEntry, FileRecord, HashCache, Manifest
from .workspace import Excludes, ScannedFile, ScanResult, check_relpath

__all__ = ["RemoteDestination", "RemoteSource", "backup_remote", "restore_remote"]

log = logging.getLogger("dolab.sync")


def backup_remote(
    engine: SyncEngine,
    server: RemoteServer,
    cache_path: Path | None = None,
    progress: Progress | None = None,
) -> BackupReport:
    """Make a snapshot of the workspace of ``server`` in ``engine``'s store if anything changed since the latest
    one (the same snapshot format as :meth:`SyncEngine.backup`); then apply retention.

    Raises :class:`~.contents.RemoteError` when the server cannot be read, StoreError when the store fails: no new
    snapshot is written then, and every earlier one stays whole.
    """
    return engine.backup_from(RemoteSource(server), cache_path, progress)


def restore_remote(
    engine: SyncEngine,
    server: RemoteServer,
    snapshot_id: str | None = None,
    cache_path: Path | None = None,
    progress: Progress | None = None,
) -> RestoreReport:
    """Write a snapshot (the latest by default) into the workspace of ``server`` through its contents API.

    Meant for a new, empty workspace: existing files of the same names are replaced. Contents are checked against
    their hashes before they are sent. Symlinks are skipped (the API cannot make them), and paths the server
    refuses (hidden names, unless it allows them) are skipped with a log line. The hash cache at ``cache_path`` is
    filled from the server's replies, so the next backup downloads nothing.
    """
    manifest = engine.manifest(snapshot_id)
    return engine.restore_to(RemoteDestination(server, cache_path), manifest, progress)


class RemoteSource:
    """The workspace of ``server``, read through its contents API."""

    thread_prefix = "dolab-remote"
    always_lists_store = True
    sees_dir_modes = False

    def __init__(self, server: RemoteServer) -> None:
        self.server = server

    def scan(self, excludes: Excludes) -> ScanResult:
        """Every file and empty folder the server lists (no links, no folder modes: the API shows neither)."""
        tree = self.server.scan(excludes)
        files = [ScannedFile(f.path, f.size, f.mtime_ns, f.mode, 0, 0) for f in tree.files]
        return ScanResult(files=files, empty_dirs=tree.empty_dirs, skipped=tree.skipped)

    def known_hash(self, f: ScannedFile, cache: HashCache, previous: FileRecord | None) -> str | None:
        """The content hash of a file whose size and time match the cache's or the previous snapshot's record."""
        sha = cache.lookup(f.path, f.size, f.mtime_ns, 0, 0)
        if sha is None and previous is not None and (previous.size, previous.mtime_ns) == (f.size, f.mtime_ns):
            sha = previous.sha256 if f.mtime_ns else None
        return sha

    def check_changed(self, todo: list[ScannedFile]) -> None:
        """Refuse a backup whose changed files weigh more than the server may send in one."""
        wanted = sum(f.size for f in todo)
        if wanted > self.server.max_read_bytes:
            raise RemoteError(
                f"Your workspace holds {wanted / (1 << 30):.1f} GiB of changed files, more than the "
                f"{self.server.max_read_bytes / (1 << 30):g} GiB a backup may read; exclude large folders from "
                "backups, or ask an administrator."
            )

    def read(self, f: ScannedFile, writer: BlobWriter) -> tuple[FileRecord, CacheEntry] | str:
        """Download the file into a private temporary file, hash it and store the contents the store lacks: its
        record and cache entry, or why it was left out (a sentence)."""
        fd, tmp = tempfile.mkstemp(dir=writer.pieces_dir)
        os.unlink(tmp)  # private: only the descriptor reaches it
        try:
            for _attempt in range(3):
                if writer.cancelled:
                    return "cancelled"
                try:
                    size = self.server.download(f.path, fd, f.size)
                except FileNotFoundError:
                    return "it was deleted during the sync"
                except Oversized as e:
                    if _attempt < 2:
                        continue  # it grew after it was listed: list-time size no longer holds, read it again
                    log.warning("Sync skips the remote file %s: %s", f.path, e)
                    return f"{e}; it is left as it was"
                except PathRefused as e:
                    log.warning("Sync skips the remote file %s: the server refused to serve it (%s)", f.path, e)
                    return f"the server refused to serve it ({e}); a symlink out of the workspace?"
                if size != f.size:
                    continue  # written while listed or read: the listing's time would not match this content
                sha, chunks = hash_content(fd, f.size)
                upload = writer.claim(sha, chunks)
                writer.put(fd, sha, chunks, upload)
                writer.account(f.size, f.size, chunks, upload)
                return FileRecord(f.path, f.size, f.mtime_ns, f.mode, sha, chunks), (f.size, f.mtime_ns, 0, 0, sha)
            log.warning("Sync leaves %s as it was: it kept changing while being read", f.path)
            return "it kept changing while being read"
        finally:
            os.close(fd)

    def snapshot_written(self, report: BackupReport, store_description: str) -> None:
        """Log the snapshot this backup wrote."""
        log.info(
            "Snapshot %s of %s (remote): %d files, %d bytes; downloaded %d, uploaded %d files (%d bytes)",
            report.snapshot,
            store_description,
            report.files,
            report.total_bytes,
            report.hashed_files,
            report.uploaded_files,
            report.uploaded_bytes,
        )


class RemoteDestination:
    """The workspace of ``server``, written through its contents API; the hash cache at ``cache_path`` (if any) is
    filled from the server's replies."""

    thread_prefix = "dolab-remote-restore"
    #: The first failure drops the files not begun yet.
    finishes_after_a_failure = False

    def __init__(self, server: RemoteServer, cache_path: Path | None = None) -> None:
        self.server = server
        self.cache_path = cache_path
        self.description = server.url
        self._entries: dict[str, CacheEntry] = {}
        self._lock = threading.Lock()
        self._refused: set[str] = set()

    def prepare(self, manifest: Manifest) -> list[FileRecord]:
        """Make every folder (parents first; those the server refuses are skipped with what is below them); the
        files that can be written."""
        folders: set[str] = set()
        for path in [*manifest.dirs, *(f.path.rpartition("/")[0] for f in manifest.files)]:
            parts = path.split("/") if path else []
            folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        for folder in sorted(folders, key=lambda p: (p.count("/"), p)):
            self._make_folder(folder)
        for link in manifest.links:
            log.warning(
                "Restore skips the symlink %s -> %s: a Jupyter server's API cannot make links", link.path, link.target
            )
        files = []
        for f in manifest.files:
            if any(f.path.startswith(r + "/") for r in self._refused):
                continue
            if not _api_name(f.path):
                log.warning("Restore skips %r: a Jupyter server's API takes only UTF-8 names", f.path)
                continue
            files.append(f)
        return files

    def _make_folder(self, folder: str) -> None:
        if any(folder == r or folder.startswith(r + "/") for r in self._refused):
            return
        if not _api_name(folder):
            self._refused.add(folder)
            log.warning("Restore skips the folder %r: a Jupyter server's API takes only UTF-8 names", folder)
            return
        try:
            self.server.make_dir(check_relpath(folder))
        except PathRefused as e:
            self._refused.add(folder)
            log.warning("Restore skips the folder %s: the server refused it (%s)", folder, e)

    def write_file(self, rec: FileRecord, fetch: Callable[[int], None], scratch: Path) -> bool:
        """Fetch one file into a private temporary file, then upload it; False when the server refuses it."""
        fd, tmp = tempfile.mkstemp(dir=scratch)
        os.unlink(tmp)
        try:
            fetch(fd)
            try:
                model = self.server.upload(rec.path, fd, rec.size)
            except PathRefused as e:
                log.warning("Restore skips %s: the server refused it (%s)", rec.path, e)
                return False
        finally:
            os.close(fd)
        mtime = parse_time_ns(model.get("last_modified"))
        if mtime and model.get("size") == rec.size:
            with self._lock:
                self._entries[rec.path] = (rec.size, mtime, 0, 0, rec.sha256)
        return True

    def finish(self, manifest: Manifest, report: RestoreReport) -> None:
        """Save the hash cache the replies filled."""
        if self.cache_path is not None:
            HashCache(self.cache_path).save(self._entries)


def _api_name(path: str) -> bool:
    """Whether ``path`` can go into a contents API URL (names that are not UTF-8 are kept as surrogate escapes)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
