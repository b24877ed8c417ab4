"""The restore's path matcher (dolab_services/sync/selection.py): what a list of paths chooses, the bounds on the
list, and a cost per entry that does not grow with the number of paths."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from dolab_services.sync.selection import (
    MAX_PATH_CHARS,
    MAX_PATHS,
    PathListRefused,
    PathSelection,
    check_path_list,
    describe_paths,
)
from dolab_services.sync.workspace import UnsafePath

ENTRIES = ["a", "a/b", "a/b/c.txt", "a/bc.txt", "ab", "ab/x", "d/e/f/g", "notes.txt", "z/a/b"]


def brute_force(wanted: list[str], path: str) -> bool:
    """The rule, as the restore stated it before: the path itself, or below it."""
    return any(path == w.rstrip("/") or path.startswith(w.rstrip("/") + "/") for w in wanted)


@pytest.mark.parametrize(
    ("wanted", "chosen"),
    [
        (["a/b"], ["a/b", "a/b/c.txt"]),
        (["a"], ["a", "a/b", "a/b/c.txt", "a/bc.txt"]),
        (["a/"], ["a", "a/b", "a/b/c.txt", "a/bc.txt"]),
        (["a/b/c.txt"], ["a/b/c.txt"]),
        (["a/b/c.txt", "a"], ["a", "a/b", "a/b/c.txt", "a/bc.txt"]),
        (["a", "a/b/c.txt"], ["a", "a/b", "a/b/c.txt", "a/bc.txt"]),
        (["d/e"], ["d/e/f/g"]),
        (["d/e/f/g/h"], []),
        (["b"], []),
        (["notes.txt", "ab", "notes.txt"], ["ab", "ab/x", "notes.txt"]),
    ],
    ids=[
        "folder",
        "top-folder",
        "trailing-slash",
        "one-file",
        "file-then-its-folder",
        "folder-then-a-file-in-it",
        "middle-folder",
        "below-a-file",
        "absent",
        "several-and-a-repeat",
    ],
)
def test_a_path_chooses_itself_and_what_lies_below_it(wanted: list[str], chosen: list[str]) -> None:
    selection = PathSelection(wanted)
    assert [e for e in ENTRIES if selection.selects(e)] == chosen
    assert chosen == [e for e in ENTRIES if brute_force(wanted, e)]


def test_a_folder_above_a_chosen_path_and_a_name_sharing_its_start_are_not_chosen() -> None:
    selection = PathSelection(["a/b"])
    assert not selection.selects("a")  # only the parent
    assert not selection.selects("a/bc.txt")  # shares "a/b" as a string, not as a folder
    assert not selection.selects("a/b.txt")


@pytest.mark.parametrize(
    "path", ["../bob/x", "/etc/passwd", "a/../../x", "a//b", "./a", "a/./b", "", "/", "a\0b"], ids=repr
)
def test_paths_that_could_leave_the_workspace_are_refused(path: str) -> None:
    with pytest.raises(UnsafePath):
        PathSelection(["fine.txt", path])


@pytest.mark.parametrize(
    ("paths", "says"),
    [
        ("notes.txt", "must be a list"),
        (["a", 3], "must be a list"),
        ({"a": 1}, "must be a list"),
        ([], "leave it out to restore everything"),
        ([f"p{i}" for i in range(MAX_PATHS + 1)], f"at most {MAX_PATHS} paths, and this one names {MAX_PATHS + 1}"),
        (["ok", "a" * (MAX_PATH_CHARS + 1)], f"Path 2 of the list has {MAX_PATH_CHARS + 1} characters"),
    ],
    ids=["a-string", "not-all-strings", "a-dict", "empty", "too-many", "too-long"],
)
def test_lists_out_of_bounds_are_refused_with_a_sentence(paths: Any, says: str) -> None:
    with pytest.raises(PathListRefused, match=says) as refused:
        check_path_list(paths)
    assert len(str(refused.value)) < 200  # the sentence never quotes the list
    assert isinstance(refused.value, ValueError)  # the service's API answers 400 for it
    if isinstance(paths, list) and all(isinstance(p, str) for p in paths):
        with pytest.raises(PathListRefused, match=says):
            PathSelection(paths)


def test_the_largest_list_allowed_is_accepted() -> None:
    folder = "/".join(["x" * 200] * 20)
    folder += "/" + "y" * (MAX_PATH_CHARS - len(folder) - 6)
    paths = [f"{folder}/{i:04d}" for i in range(MAX_PATHS - 1)] + ["notes.txt"]
    assert len(paths) == MAX_PATHS and max(map(len, paths)) == MAX_PATH_CHARS
    selection = PathSelection(paths)
    assert selection.selects("notes.txt")
    assert not selection.selects("notes.txt.bak")


def test_an_endless_iterable_is_refused_without_being_read_whole() -> None:
    def endless() -> Iterator[str]:
        i = 0
        while True:
            yield f"p{i}"
            i += 1

    with pytest.raises(PathListRefused, match=f"at most {MAX_PATHS} paths"):
        PathSelection(endless())


def test_descriptions_are_short_whatever_the_list() -> None:
    assert describe_paths(["a", "b"]) == "a, b"
    assert describe_paths([]) == "no path"
    long_list = ["x" * MAX_PATH_CHARS] * MAX_PATHS
    text = describe_paths(long_list)
    assert len(text) < 300 and text.endswith(f"and {MAX_PATHS - 3} more")
    assert str(PathSelection(["a", "b/c"])) == "a, b/c"


def _lines_run(selection: PathSelection, path: str) -> int:
    """How many lines of :meth:`PathSelection.selects` one call runs (a count of work, not a timing)."""
    code = PathSelection.selects.__code__
    count = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if frame.f_code is not code:
            return None
        if event == "line":
            count += 1
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        selection.selects(path)
    finally:
        sys.settrace(previous)
    return count


def test_the_cost_of_an_entry_is_its_depth_not_the_number_of_paths() -> None:
    few = PathSelection(["data/run-0001/out.csv"])
    many = PathSelection([f"data/run-{i:04d}/out.csv" for i in range(MAX_PATHS - 1)] + ["y" * 3000 + "/z"])
    for entry in ["data/run-0001/out.csv", "data/run-0999/log.txt", "data/other", "elsewhere/deep/a/b/c/d"]:
        assert _lines_run(many, entry) == _lines_run(few, entry), entry
    # And it stops at the first component the paths lack, however deep the entry.
    deep = "/".join(["nothere"] + ["d"] * 2000)
    assert _lines_run(many, deep) == _lines_run(many, "nothere")
