"""Which entries of a snapshot a restore's ``paths`` choose: a bounded list, matched through a prefix tree.

A restore may name files or folders (``notebooks/lost.ipynb``, ``data``); an entry of the snapshot is chosen when
it is one of them or lies below one. Comparing every entry with every path costs entries x paths (8,000 of each
kept the service's CPU busy for 20 s); here the paths become a tree of their components, and an entry walks down
it one component at a time, stopping at the first one the tree lacks. An entry so costs at most its own depth,
however many paths the request names, and a request costs entries x depth plus the length of its list.

The list itself comes from a user and is bounded (:data:`MAX_PATHS` paths of at most :data:`MAX_PATH_CHARS`
characters each, a few MiB in all), so no request can make the tree, the log lines or the error messages large.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice

from .workspace import check_relpath

__all__ = ["MAX_PATHS", "MAX_PATH_CHARS", "PathListRefused", "PathSelection", "check_path_list", "describe_paths"]

#: At most this many paths in one restore (the folder that holds them restores them all in one request).
MAX_PATHS = 1000
#: At most this many characters in one path (Linux's PATH_MAX is 4,096 bytes).
MAX_PATH_CHARS = 4096
#: Paths quoted in a log line or an error message; the rest are counted.
_QUOTED_PATHS = 3
_QUOTED_CHARS = 80

#: A node of the tree: the next component -> its node. A node without children ends a path the request names,
#: so everything below it is chosen (a path inserted below it adds nothing).
_Tree = dict[str, "_Tree"]


class PathListRefused(ValueError):
    """The list of paths is not one the service restores (not a list of strings, empty, too long, a path too
    long); ``str(error)`` is a sentence for the user."""


def check_path_list(paths: object) -> list[str]:
    """``paths`` as a list of strings within the bounds, or PathListRefused with a sentence. It checks sizes only:
    :class:`PathSelection` refuses paths that could leave the workspace."""
    if not isinstance(paths, list | tuple) or not all(isinstance(p, str) for p in paths):
        raise PathListRefused("paths must be a list of paths relative to your workspace.")
    if not paths:
        raise PathListRefused("paths is empty: leave it out to restore everything, or name what to restore.")
    if len(paths) > MAX_PATHS:
        raise PathListRefused(
            f"A restore names at most {MAX_PATHS} paths, and this one names {len(paths)}: restore the folder that "
            "holds them, or restore them in several requests."
        )
    for index, path in enumerate(paths):
        if len(path) > MAX_PATH_CHARS:
            raise PathListRefused(
                f"Path {index + 1} of the list has {len(path)} characters; a path to restore has at most "
                f"{MAX_PATH_CHARS}."
            )
    return list(paths)


def describe_paths(paths: Sequence[str]) -> str:
    """A short description of a list of paths for log lines and messages: the first few, shortened, and a count."""
    quoted = [p if len(p) <= _QUOTED_CHARS else p[: _QUOTED_CHARS - 3] + "..." for p in paths[:_QUOTED_PATHS]]
    more = len(paths) - len(quoted)
    if not quoted:
        return "no path"
    return ", ".join(quoted) + (f" and {more} more" if more > 0 else "")


class PathSelection:
    """The entries a restore's ``paths`` choose: each path itself and everything below it.

    ``PathSelection(["notes/a.txt", "data"])`` refuses a list out of bounds (:class:`PathListRefused`) and a path
    that could leave the workspace (:class:`~.workspace.UnsafePath`); a trailing ``/`` is ignored.
    :meth:`selects` then costs at most the depth of the entry asked about.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        # One past the bound is enough to refuse an iterable too long without reading all of it.
        wanted = check_path_list(paths if isinstance(paths, list | tuple) else list(islice(paths, MAX_PATHS + 1)))
        self.paths = [check_relpath(p.rstrip("/")) for p in wanted]
        self._tree: _Tree = {}
        for path in self.paths:
            self._insert(path.split("/"))

    def _insert(self, parts: list[str]) -> None:
        node = self._tree
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not child:
                return  # a folder above is chosen whole already
            node = child
        node[parts[-1]] = {}  # chosen whole, and whatever was chosen below it with it

    def selects(self, path: str) -> bool:
        """Whether the entry at ``path`` (relative, ``/``-separated, as a manifest holds it) is chosen."""
        node = self._tree
        start = 0
        while True:
            end = path.find("/", start)
            child = node.get(path[start:] if end < 0 else path[start:end])
            if child is None:
                return False
            if not child:
                return True  # a chosen path, or below one
            if end < 0:
                return False  # a folder above a chosen path is not chosen itself
            node, start = child, end + 1

    def __str__(self) -> str:
        return describe_paths(self.paths)
