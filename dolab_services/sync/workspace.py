"""Reading a user's workspace safely: relative paths only, never through a symlink, never outside.

A workspace belongs to its user, who can put anything in it, including symlinks to the host's files, and can
swap a directory for a symlink while a sync runs. So nothing here resolves a path by name: the root is opened
once, every directory below it with ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent's descriptor, files with
``O_NOFOLLOW``, and the scan lists directories through their descriptors (:mod:`.dirfd` does the walking, for
backups and restores alike). A symlink is never followed. One that stays inside the workspace is recorded as a link
(and recreated on restore); one that leads outside, by its own text (absolute, climbing above the root) or through
other links of the workspace (``a/up -> ..`` then ``x -> a/up/../bob``), is refused with a log line
(:func:`leaving_links` judges them against the recorded links alone, never the live file system). Sockets, FIFOs
and devices are skipped. Names that are not valid UTF-8 are kept as the bytes they are (PEP 383 surrogate escapes
in the ``str``), and so are backed up and restored like any other.

Stores take file *paths*; a descriptor opened here is handed to them as ``/proc/self/fd/<n>``, which reopens that
very file whatever happens to its name meanwhile (Linux).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .dirfd import UnsafePath, open_read, open_root, opened, walk

__all__ = [
    "DEFAULT_EXCLUDES",
    "DIR_MODE_BITS",
    "Excludes",
    "LinkEntry",
    "ScanResult",
    "ScannedFile",
    "UnsafePath",
    "check_relpath",
    "fd_path",
    "leaving_links",
    "link_stays_inside",
    "open_dir",
    "open_file",
    "open_file_at",
    "scan",
]

log = logging.getLogger("dolab.sync")

#: Directory or file names never backed up, wherever they are.
DEFAULT_EXCLUDES = (".ipynb_checkpoints", "__pycache__")
#: The mode bits of a folder that are backed up and restored: permissions, setgid (shared groups) and sticky.
DIR_MODE_BITS = 0o3777
#: Symlinks followed when judging where a link leads (the kernel's own limit: past it, a lookup fails with ELOOP).
_MAX_LINKS = 40


def check_relpath(path: str) -> str:
    """Return ``path`` if it is a clean relative ``/``-separated path inside a workspace, else raise UnsafePath.

    A name that is not UTF-8 comes as surrogate escapes of its bytes (``os.fsdecode``); any other lone surrogate
    (which no file name can be) is refused too."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise UnsafePath(f"{path!r} is not a file path")
    if path.startswith("/"):
        raise UnsafePath(f"{path!r} is an absolute path; paths are relative to the workspace")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"{path!r} must not contain '..', '.' or empty parts")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise UnsafePath(f"{path!r} is not a file name") from None
    return path


def link_stays_inside(link_path: str, target: str) -> bool:
    """Whether a symlink at ``link_path`` (relative to the root) pointing to ``target`` resolves inside the root,
    judged by its text alone (a relative target that never climbs above the root). Links it passes can still
    leave through other links: see :func:`leaving_links`."""
    if not target or target.startswith("/") or "\0" in target:
        return False
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(link_path), target))
    return not (joined == ".." or joined.startswith("../") or joined.startswith("/"))


class _TooDeep:
    """More links on the way than the kernel follows (it answers ELOOP)."""


class _Unwind(Exception):
    """Links nested too deep to follow by recursion: every frame with more than :data:`_MAX_LINKS` of them below
    it is too deep for certain (and remembered so); the root of the judgement is one of them."""

    def __init__(self, depth: int) -> None:
        self.depth = depth


_TOO_DEEP = _TooDeep()
#: Where a link leads (parts from the root) and how many links resolving it follows (itself included); None: out
#: of the root or a loop; _TOO_DEEP: more than the kernel follows.
_Resolved = tuple[tuple[str, ...], int] | _TooDeep | None


def leaving_links(links: Mapping[str, str], only: Iterable[str] | None = None) -> set[str]:
    """The paths of the links (``links``: path -> target, relative to the root) that lead out of the root, round
    in a loop, or through more than 40 links, when followed as the kernel would: part by part, through the other
    links in ``links`` (the snapshot's own, never the live file system). ``only``: judge just these (default: all).

    Each link is worked out once (its result does not depend on the way in), so a hostile manifest's chains cost
    time in proportion to the number of links."""
    resolver = _LinkResolver(links)
    return {path for path in (links if only is None else only) if path in links and resolver.leaves(path)}


class _LinkResolver:
    """Follows the links of one mapping (path -> target) as the kernel would, remembering each link's result."""

    def __init__(self, links: Mapping[str, str]) -> None:
        self.links = links
        self.known: dict[str, _Resolved] = {}
        self.stack: list[str] = []  # the links being resolved, outermost first

    def leaves(self, path: str) -> bool:
        """Whether the link at ``path`` leads out of the root, loops, or goes through too many links."""
        try:
            return not isinstance(self.follow(path), tuple)
        except _Unwind:
            return True

    def follow(self, path: str) -> _Resolved:
        """Where the link at ``path`` leads, and through how many links."""
        if path in self.known:
            return self.known[path]
        if path in self.stack:
            return None  # resolving it needs itself: a loop (ELOOP)
        if len(self.stack) > 2 * _MAX_LINKS:
            raise _Unwind(len(self.stack))
        target = self.links[path]
        result: _Resolved = None
        if not target.startswith("/"):
            self.stack.append(path)
            try:
                parent = path.rpartition("/")[0]
                result = self.resolve([*parent.split("/"), *target.split("/")])
            except _Unwind as e:
                if e.depth - (len(self.stack) - 1) > _MAX_LINKS:
                    self.known[path] = _TOO_DEEP
                raise
            finally:
                self.stack.pop()
            if isinstance(result, tuple):
                result = (result[0], result[1] + 1)
        self.known[path] = result
        return result

    def resolve(self, parts: list[str]) -> _Resolved:
        """Where the path ``parts`` (from the root) leads, part by part through the links."""
        here: list[str] = []
        used = 0
        for part in parts:
            if part in ("", "."):
                continue
            if part == "..":
                if not here:
                    return None  # above the root
                here.pop()
                continue
            here.append(part)
            key = "/".join(here)
            if key in self.links:
                where = self.follow(key)
                if not isinstance(where, tuple):
                    return where
                here, used = list(where[0]), used + where[1]
                if used >= _MAX_LINKS:  # with the link being resolved, one more than the kernel follows
                    return _TOO_DEEP
        return tuple(here), used


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
    """Everything a scan found: files, in-workspace links, empty directories, every directory's mode (path ->
    mode bits, the root's not included), and what it skipped (path, why)."""

    files: list[ScannedFile] = field(default_factory=list)
    links: list[LinkEntry] = field(default_factory=list)
    empty_dirs: list[str] = field(default_factory=list)
    dir_modes: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def scan(root: Path | int, excludes: Excludes = Excludes()) -> ScanResult:
    """Walk the workspace at ``root`` (its path, or a descriptor of it from :func:`.dirfd.open_root`) through
    directory descriptors; never follows a symlink."""
    result = ScanResult()
    every_link: dict[str, str] = {}
    with opened(open_root(root) if isinstance(root, Path) else os.dup(root)) as root_fd:
        _scan_dir(root_fd, "", excludes, result, every_link)
    # Links that stay inside by their text can still leave through other links (those refused included).
    leaving = leaving_links(every_link, only=[link.path for link in result.links])
    if leaving:
        for link in result.links:
            if link.path in leaving:
                why = f"symlink to {link.target!r} leads out of the workspace (through other links) or loops; refused"
                _skip(result, link.path, why, logging.WARNING)
        result.links = [link for link in result.links if link.path not in leaving]
    result.files.sort(key=lambda f: f.path)
    return result


def _skip(result: ScanResult, path: str, why: str, level: int = logging.INFO) -> None:
    log.log(level, "Sync skips %r: %s", path, why)
    result.skipped.append((path, why))


def _scan_dir(dir_fd: int, prefix: str, excludes: Excludes, result: ScanResult, every_link: dict[str, str]) -> None:
    with os.scandir(dir_fd) as it:
        for entry in it:
            name = entry.name
            path = prefix + name
            if excludes.excluded(path, name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while scanning
            if stat.S_ISDIR(st.st_mode):
                try:
                    sub_fd = walk(dir_fd, name)
                except (OSError, UnsafePath) as e:  # swapped for something else since it was listed
                    _skip(result, path + "/", f"cannot open the folder ({e})", logging.WARNING)
                    continue
                result.dir_modes[path] = stat.S_IMODE(st.st_mode) & DIR_MODE_BITS
                with opened(sub_fd):
                    before = len(result.files) + len(result.links) + len(result.empty_dirs)
                    _scan_dir(sub_fd, path + "/", excludes, result, every_link)
                    if len(result.files) + len(result.links) + len(result.empty_dirs) == before:
                        result.empty_dirs.append(path)
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
                every_link[path] = target
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
    with opened(open_root(root)) as root_fd, opened(walk(root_fd, relpath, create=create, owner=owner)) as fd:
        yield fd


@contextmanager
def open_file_at(root_fd: int, relpath: str) -> Iterator[int]:
    """A read-only descriptor of the regular file ``relpath`` below the folder ``root_fd`` (no symlink anywhere on
    the way). Raises FileNotFoundError when it is gone, UnsafePath when something on the way is a symlink or not
    a file."""
    check_relpath(relpath)
    parent, _, name = relpath.rpartition("/")
    if parent:
        with opened(walk(root_fd, parent)) as dir_fd:
            fd = open_read(dir_fd, name, relpath)
    else:
        fd = open_read(root_fd, name, relpath)
    with opened(fd):
        yield fd


@contextmanager
def open_file(root: Path, relpath: str) -> Iterator[int]:
    """:func:`open_file_at` from the workspace folder ``root``."""
    with opened(open_root(root)) as root_fd, open_file_at(root_fd, relpath) as fd:
        yield fd


def fd_path(fd: int) -> Path:
    """A path that reopens exactly the file behind ``fd`` (Linux ``/proc/self/fd``)."""
    return Path(f"/proc/self/fd/{fd}")
