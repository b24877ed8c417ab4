"""Walking a file tree its user can change under us, by directory descriptors only.

A workspace belongs to its user, who can swap any folder of it for a symlink (to ``/etc``, to another user's
workspace) at any moment, also between our check of a path and our use of it. The sync service is root, so a path
resolved again by name after a check can be made to land anywhere on the host. Everything here therefore works
from an open descriptor of the tree's root down, one name at a time, and never resolves a path string:

- folders are opened with ``O_DIRECTORY | O_NOFOLLOW`` relative to their parent's descriptor (``openat``), and
  made with ``mkdirat``; a name that is (or has become) a symlink fails to open, and the caller refuses the path;
- files are opened with ``O_NOFOLLOW`` (reads also ``O_NONBLOCK``, so a FIFO swapped in cannot block), created
  with ``O_CREAT | O_EXCL`` under a random name and renamed over their place within the same open folder
  (``renameat``), which replaces a symlink planted there instead of writing through it;
- modes, owners and times are set on descriptors (``fchmod``, ``fchown``, ``futimens``), or with
  ``follow_symlinks=False`` on a link itself.

Names are Python strings as :func:`os.scandir` gives them: a name that is not valid UTF-8 carries its bytes as
surrogate escapes (PEP 383) and reaches the kernel as those very bytes.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "DIR_FLAGS",
    "UnsafePath",
    "check_name",
    "create_temp",
    "make_symlink",
    "open_parent",
    "open_read",
    "open_root",
    "opened",
    "walk",
]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_TEMP_PREFIX = ".dolab-restore-"


class UnsafePath(ValueError):
    """A path that could leave the workspace (absolute, ``..``, empty segments, NUL) or goes through a symlink."""


def open_root(path: Path) -> int:
    """A descriptor of the tree's root folder ``path`` (a trusted path: the service's own workspace root and a
    name it chose; only its last part must not be a symlink)."""
    try:
        return os.open(path, DIR_FLAGS)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise UnsafePath(f"{path} is not a folder (or is a symlink)") from e


@contextmanager
def opened(fd: int) -> Iterator[int]:
    """Close ``fd`` at the end of the block."""
    try:
        yield fd
    finally:
        os.close(fd)


def walk(
    base_fd: int,
    relpath: str,
    *,
    create: bool = False,
    owner: tuple[int, int] | None = None,
    made: Callable[[str], None] | None = None,
) -> int:
    """A new descriptor of the folder ``relpath`` ("" for ``base_fd``'s own folder) below ``base_fd``, each part
    opened without following a symlink. With ``create``, missing folders are made (mode 0755 less the umask;
    given ``owner``; ``made`` is told each relative path made). Raises UnsafePath when a part is a symlink or not
    a folder, FileNotFoundError when one is missing and ``create`` is off."""
    parts = relpath.split("/") if relpath else []
    for part in parts:
        check_name(part, relpath)
    fd = os.dup(base_fd)
    done: list[str] = []
    try:
        for part in parts:
            done.append(part)
            try:
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                nxt = _make_dir(fd, part, relpath, owner, made, "/".join(done))
            except OSError as e:
                raise UnsafePath(f"{relpath!r}: {part!r} is not a folder (or is a symlink)") from e
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_name(name: str, relpath: str = "") -> str:
    """``name`` if it is one plain name (no ``/``, not ``.`` or ``..``, no NUL), else UnsafePath: a name with a
    ``/`` would be resolved by the kernel, following symlinks on the way."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafePath(f"{relpath or name!r} is not a clean path")
    return name


def _make_dir(
    parent_fd: int,
    name: str,
    relpath: str,
    owner: tuple[int, int] | None,
    made: Callable[[str], None] | None,
    done: str,
) -> int:
    try:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
        new = True
    except FileExistsError:
        new = False  # another restore thread (or the user) made it first
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as e:  # swapped for a symlink (or a file) since
        raise UnsafePath(f"{relpath!r}: {name!r} is not a folder (or is a symlink)") from e
    if new:
        if owner is not None:
            os.fchown(fd, *owner)
        if made is not None:
            made(done)
    return fd


def open_parent(
    base_fd: int,
    relpath: str,
    *,
    create: bool = False,
    owner: tuple[int, int] | None = None,
    made: Callable[[str], None] | None = None,
) -> tuple[int, str]:
    """A new descriptor of ``relpath``'s folder below ``base_fd`` (as :func:`walk`), and its last name."""
    parent, _, name = relpath.rpartition("/")
    return walk(base_fd, parent, create=create, owner=owner, made=made), check_name(name, relpath)


def open_read(dir_fd: int, name: str, relpath: str = "") -> int:
    """A read-only descriptor of the regular file ``name`` in ``dir_fd``. FileNotFoundError when it is gone,
    UnsafePath when it is a symlink or not a regular file."""
    check_name(name, relpath)
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise UnsafePath(f"{relpath or name!r} cannot be opened safely ({e.strerror})") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{relpath or name!r} is no longer a regular file")
    return fd


def create_temp(dir_fd: int) -> tuple[int, str]:
    """A new, empty file (mode 0600, read-write) under a random name in ``dir_fd``: its descriptor and name."""
    while True:
        name = f"{_TEMP_PREFIX}{secrets.token_hex(6)}"
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(name, flags, 0o600, dir_fd=dir_fd), name
        except FileExistsError:
            continue  # the user made that name: draw another


def make_symlink(dir_fd: int, name: str, target: str, owner: tuple[int, int] | None) -> bool:
    """Make ``name`` in ``dir_fd`` a symlink to ``target`` (owned by ``owner``), replacing a file or link there:
    made under a random name, then renamed over. False (nothing changed) when ``name`` is a folder."""
    check_name(name)
    while True:
        tmp = f"{_TEMP_PREFIX}{secrets.token_hex(6)}"
        try:
            os.symlink(target, tmp, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    try:
        if owner is not None:
            os.chown(tmp, *owner, dir_fd=dir_fd, follow_symlinks=False)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return True
    except IsADirectoryError:
        os.unlink(tmp, dir_fd=dir_fd)
        return False
    except BaseException:
        os.unlink(tmp, dir_fd=dir_fd)
        raise
