"""Reading and writing a user's workspace safely: relative paths only, never through a symlink, never outside.

A workspace belongs to its user, who can put anything in it, including symlinks to the host's files, and can
swap a directory for a symlink while a sync runs. So nothing here resolves a path by name from the root: every
directory is opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent's descriptor (``openat``), files with
``O_NOFOLLOW``, and the scan lists directories through their descriptors. A symlink is never followed: one that
stays inside the workspace is recorded as a link (and recreated on restore), one that points outside (absolute, or
climbing above the root) is refused with a log line. Sockets, FIFOs and devices are skipped.

Stores take file *paths*; a descriptor opened here is handed to them as ``/proc/self/fd/<n>``, which reopens that
very file whatever happens to its name meanwhile (Linux).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_EXCLUDES",
    "Excludes",
    "LinkEntry",
    "ScanResult",
    "ScannedFile",
    "UnsafePath",
    "check_relpath",
    "fd_path",
    "link_stays_inside",
    "open_dir",
    "open_file",
    "scan",
]

log = logging.getLogger("dolab.sync")

#: Directory or file names never backed up, wherever they are.
DEFAULT_EXCLUDES = (".ipynb_checkpoints", "__pycache__")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(ValueError):
    """A path that could leave the workspace (absolute, ``..``, empty segments, NUL) or goes through a symlink."""


def check_relpath(path: str) -> str:
    """Return ``path`` if it is a clean relative ``/``-separated path inside a workspace, else raise UnsafePath."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise UnsafePath(f"{path!r} is not a file path")
    if path.startswith("/"):
        raise UnsafePath(f"{path!r} is an absolute path; paths are relative to the workspace")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"{path!r} must not contain '..', '.' or empty parts")
    return path


def link_stays_inside(link_path: str, target: str) -> bool:
    """Whether a symlink at ``link_path`` (relative to the root) pointing to ``target`` resolves inside the root,
    judged by its text alone (a relative target that never climbs above the root)."""
    if not target or target.startswith("/") or "\0" in target:
        return False
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(link_path), target))
    return not (joined == ".." or joined.startswith("../") or joined.startswith("/"))


@dataclass(frozen=True)
class Excludes:
    """What a scan leaves out: names anywhere (``names``), ``fnmatch`` globs on the relative path or the name
    (``globs``, e.g. ``*.tmp``, ``data/raw/*``), and files above ``max_file_bytes`` (0: no cap)."""

    names: tuple[str, ...] = DEFAULT_EXCLUDES
    globs: tuple[str, ...] = ()
    max_file_bytes: int = 0

    def excluded(self, path: str, name: str) -> bool:
        """Whether ``path`` (relative, name ``name``) is left out by name or glob."""
        if name in self.names:
            return True
        return any(fnmatch.fnmatchcase(path, g) or fnmatch.fnmatchcase(name, g) for g in self.globs)


@dataclass(frozen=True)
class ScannedFile:
    """A regular file as the scan saw it (``lstat``): the manifest's fields and the cache's identity fields."""

    path: str
    size: int
    mtime_ns: int
    mode: int
    ctime_ns: int
    ino: int


@dataclass(frozen=True)
class LinkEntry:
    """A symlink that stays inside the workspace: recreated as is on restore."""

    path: str
    target: str


@dataclass
class ScanResult:
    """Everything a scan found: files, in-workspace links, empty directories, and what it skipped (path, why)."""

    files: list[ScannedFile] = field(default_factory=list)
    links: list[LinkEntry] = field(default_factory=list)
    empty_dirs: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def scan(root: Path, excludes: Excludes = Excludes()) -> ScanResult:
    """Walk the workspace at ``root`` through directory descriptors; never follows a symlink."""
    result = ScanResult()
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        _scan_dir(root_fd, "", excludes, result)
    finally:
        os.close(root_fd)
    result.files.sort(key=lambda f: f.path)
    return result


def _skip(result: ScanResult, path: str, why: str, level: int = logging.INFO) -> None:
    log.log(level, "Sync skips %s: %s", path, why)
    result.skipped.append((path, why))


def _scan_dir(dir_fd: int, prefix: str, excludes: Excludes, result: ScanResult) -> None:
    entries = 0
    with os.scandir(dir_fd) as it:
        for entry in it:
            entries += 1
            try:
                name = entry.name
                name.encode("utf-8")
            except UnicodeEncodeError:
                _skip(result, prefix + repr(entry.name)[1:-1], "its name is not valid UTF-8")
                continue
            path = prefix + name
            if excludes.excluded(path, name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while scanning
            if stat.S_ISDIR(st.st_mode):
                try:
                    sub_fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                except OSError as e:
                    _skip(result, path + "/", f"cannot open the folder ({e.strerror})", logging.WARNING)
                    continue
                try:
                    before = len(result.files) + len(result.links) + len(result.empty_dirs)
                    _scan_dir(sub_fd, path + "/", excludes, result)
                    if len(result.files) + len(result.links) + len(result.empty_dirs) == before:
                        result.empty_dirs.append(path)
                finally:
                    os.close(sub_fd)
            elif stat.S_ISREG(st.st_mode):
                if excludes.max_file_bytes and st.st_size > excludes.max_file_bytes:
                    _skip(result, path, f"{st.st_size} bytes is over the {excludes.max_file_bytes}-byte cap")
                    continue
                mode = stat.S_IMODE(st.st_mode) & 0o777
                result.files.append(ScannedFile(path, st.st_size, st.st_mtime_ns, mode, st.st_ctime_ns, st.st_ino))
            elif stat.S_ISLNK(st.st_mode):
                try:
                    target = os.readlink(name, dir_fd=dir_fd)
                except OSError:
                    continue
                if link_stays_inside(path, target):
                    result.links.append(LinkEntry(path, target))
                else:
                    _skip(result, path, f"symlink to {target!r} leads out of the workspace; refused", logging.WARNING)
            else:
                _skip(result, path, "not a regular file, folder or symlink")


@contextmanager
def open_dir(root: Path, relpath: str, create: bool = False, owner: tuple[int, int] | None = None) -> Iterator[int]:
    """A descriptor of the directory ``relpath`` ("" for the root) under ``root``, walked without following any
    symlink; with ``create``, missing directories are made (mode 0755, given ``owner`` when set)."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in relpath.split("/") if relpath else ():
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    made = True
                except FileExistsError:
                    made = False  # another restore thread made it first
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    raise UnsafePath(f"{relpath!r}: {part!r} is not a folder (or is a symlink)") from e
                if made and owner is not None:
                    os.fchown(nxt, *owner)
            except OSError as e:
                raise UnsafePath(f"{relpath!r}: {part!r} is not a folder (or is a symlink)") from e
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


@contextmanager
def open_file(root: Path, relpath: str) -> Iterator[int]:
    """A read-only descriptor of the regular file ``relpath`` under ``root`` (no symlink anywhere on the way).

    Raises FileNotFoundError when it is gone, UnsafePath when something on the way is a symlink or not a file.
    """
    check_relpath(relpath)
    parent, _, name = relpath.rpartition("/")
    with open_dir(root, parent) as dir_fd:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise UnsafePath(f"{relpath!r} cannot be opened safely ({e.strerror})") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(f"{relpath!r} is no longer a regular file")
        yield fd
    finally:
        os.close(fd)


def fd_path(fd: int) -> Path:
    """A path that reopens exactly the file behind ``fd`` (Linux ``/proc/self/fd``)."""
    return Path(f"/proc/self/fd/{fd}")
