"""A workspace on this machine as where a backup reads files from (:class:`LocalSource`) and a restore writes them
to (:class:`LocalDestination`), for the steps :class:`~.engine.SyncEngine` runs.

Workspace access goes through :mod:`.workspace` and :mod:`.dirfd`: a backup and a restore each open the workspace's
root once and reach everything below it by directory descriptors (``openat`` with ``O_NOFOLLOW``), never by
resolving a path again, so a user who swaps a folder for a symlink while the service (root) works gets a refusal,
never a read or a write outside the workspace.

What only a local workspace has: the hash cache's full identity (size, mtime, ctime, inode), so a file is read
again whenever its ctime moved; symlinks inside the workspace (recorded, recreated); folders' modes (backed up,
given back); files' modes, owners and times set on restore. A file that changes while it is read is read again,
then left as it was in the previous snapshot, with a log line.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .blobs import BlobWriter, hash_content
from .dirfd import create_temp, make_symlink, open_parent, open_root, opened, walk
from .manifest import CacheEntry, FileRecord, HashCache, Manifest, blob_key
from .selection import PathSelection
from .store import ObjectNotFound
from .workspace import (
    Excludes,
    LinkEntry,
    ScannedFile,
    ScanResult,
    UnsafePath,
    check_relpath,
    open_file_at,
    scan,
)

if TYPE_CHECKING:
    from .engine import BackupReport, RestoreReport

__all__ = ["LocalDestination", "LocalSource"]

log = logging.getLogger("dolab.sync")


class LocalSource:
    """The workspace whose root is open at ``root_fd`` (for the whole backup), read by descriptors."""

    thread_prefix = "dolab-sync"
    always_lists_store = False  # the store's blobs are listed only without a cache or after a sync that died
    sees_dir_modes = True

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd

    def scan(self, excludes: Excludes) -> ScanResult:
        """Every file, in-workspace link, empty folder and folder mode below the root."""
        return scan(self.root_fd, excludes)

    def known_hash(self, f: ScannedFile, cache: HashCache, previous: FileRecord | None) -> str | None:
        """The content hash of a file the cache saw with this very identity (ctime and inode included)."""
        return cache.lookup(f.path, f.size, f.mtime_ns, f.ctime_ns, f.ino)

    def check_changed(self, todo: list[ScannedFile]) -> None:
        """Nothing to check: a local workspace's changed files are read whatever their size."""

    def read(self, f: ScannedFile, writer: BlobWriter) -> tuple[FileRecord, CacheEntry] | str:
        """Hash the file (held open) and store the contents the store lacks: its record and cache entry, or why it
        was left out (a sentence)."""
        for _attempt in range(3):
            if writer.cancelled:
                return "cancelled"
            try:
                with open_file_at(self.root_fd, f.path) as fd:
                    before = os.fstat(fd)
                    sha, chunks = hash_content(fd, before.st_size)
                    upload = writer.claim(sha, chunks)
                    writer.put(fd, sha, chunks, upload)
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
                    writer.store.delete(blob_key(h) for h in upload)
                    writer.release(upload)
                continue
            writer.account(after.st_size, f.size, chunks, upload)
            mode = after.st_mode & 0o777
            return (
                FileRecord(f.path, after.st_size, after.st_mtime_ns, mode, sha, chunks),
                (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino, sha),
            )
        log.warning("Sync leaves %s as it was: it kept changing while being read", f.path)
        return "it kept changing while being read"

    def snapshot_written(self, report: BackupReport, store_description: str) -> None:
        """Log the snapshot this backup wrote."""
        log.info(
            "Snapshot %s of %s: %d files, %d bytes; uploaded %d files, %d bytes",
            report.snapshot,
            store_description,
            report.files,
            report.total_bytes,
            report.uploaded_files,
            report.uploaded_bytes,
        )


class LocalDestination:
    """Where a restore writes: the folder ``into`` below the workspace root ``root``, held open by a descriptor
    for the whole restore; every folder below is reached from it by :mod:`.dirfd` (made when missing, given the
    root's owner when the service is root), so nothing is ever resolved by path again. ``paths``: only these
    (files, or folders and all below) of the snapshot; None for all of it."""

    thread_prefix = "dolab-restore"
    #: A failed file does not stop the others: every file that can be is written before the failure is raised.
    finishes_after_a_failure = True

    def __init__(self, root: Path, into: str = "", paths: Iterable[str] | None = None) -> None:
        self.root = root
        self.into = into
        self.description = f"{root}/{into}" if into else str(root)
        self.selection = PathSelection(paths) if paths is not None else None  # bounded: each entry costs its depth
        self.owner: tuple[int, int] | None = None
        self.fd = -1  # ``into``, open from :meth:`prepare` on
        self._made: set[str] = set()  # folders this restore made (relative to ``into``)
        self._lock = threading.Lock()
        self._links: list[LinkEntry] = []

    def __enter__(self) -> LocalDestination:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)

    def prepare(self, manifest: Manifest) -> list[FileRecord]:
        """Open ``into`` (made when missing) and make the snapshot's empty folders (those selected); the files to
        write. ObjectNotFound when the selection holds nothing (then nothing is made)."""
        files, links, dirs = manifest.files, manifest.links, manifest.dirs
        if self.selection is not None:
            selection = self.selection
            files = [f for f in files if selection.selects(f.path)]
            links = [link for link in links if selection.selects(link.path)]
            dirs = [d for d in dirs if selection.selects(d)]
            if not (files or links or dirs):
                raise ObjectNotFound(f"The restore point {manifest.snapshot} holds nothing at {selection}.")
        if self.into:
            check_relpath(self.into)
        with opened(open_root(self.root)) as root_fd:
            st = os.fstat(root_fd)
            self.owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
            self.fd = walk(root_fd, self.into, create=True, owner=self.owner)
        for d in dirs:
            self.make_dir(d)
        self._links = links
        return files

    def finish(self, manifest: Manifest, report: RestoreReport) -> None:
        """Make the links, then give folders their modes (last, so that a read-only folder was written into)."""
        for link in self._links:
            if self.make_link(link):
                report.links += 1
            else:
                log.warning("Restore keeps the folder %r where the backup has a link", link.path)
        self.set_dir_modes(manifest.dir_modes, every=self.selection is None)

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

    def write_file(self, rec: FileRecord, fetch: Callable[[int], None], scratch: Path) -> bool:
        """Fetch one file (``fetch`` fills a descriptor and checks it) next to its place under a random name, then
        rename it over the place (which replaces a symlink planted there, never writes through it)."""
        dfd, name = self.parent(rec.path)
        with opened(dfd):
            fd, tmp = create_temp(dfd)
            try:
                fetch(fd)
                os.fchmod(fd, rec.mode)
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
                os.utime(fd, ns=(rec.mtime_ns, rec.mtime_ns))
                try:
                    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except IsADirectoryError:
                    raise UnsafePath(
                        f"There is a folder at {rec.path}, where the backup has a file: move it away, then restore "
                        "again."
                    ) from None
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except OSError:
                    pass
                raise
            finally:
                os.close(fd)
        return True
