"""System accounts for local servers (dolab_spawner.backends.system_users); the data directory they must not read
is tests/core/test_paths.py, the start-up check of the shipped config tests/spawner/backends/test_local.py.

Account creation runs the real useradd (the tests run as root); every account made here has a prefix no real
account has and is removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import secrets
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dolab_spawner.backends.system_users import (
    NAME_MAX,
    Account,
    AccountError,
    account_name,
    check_prefix,
    ensure_account,
    hand_over_workspace,
    unreachable_folder,
)
from tests.e2e.hub import let_accounts_through

USERADD_NAME = re.compile(r"[a-z_][a-z0-9_-]*")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="making accounts and changing owners needs root")

NAMES = [
    pytest.param("alice", "jupyter-", "jupyter-alice", id="plain"),
    pytest.param("a-b-3", "jupyter-", "jupyter-a-b-3", id="dashes-digits"),
    pytest.param("42", "jupyter-", "jupyter-42", id="digits"),
    pytest.param("alice", "", "alice", id="no-prefix-plain"),
]


@pytest.mark.parametrize(("hub_name", "prefix", "expected"), NAMES)
def test_plain_names_are_kept(hub_name: str, prefix: str, expected: str) -> None:
    assert account_name(hub_name, prefix) == expected


ODD = [
    pytest.param("Alice", id="capital"),
    pytest.param("kim.o'neil@example.org", id="punctuation"),
    pytest.param("-rf", id="leading-dash"),
    pytest.param("a_b", id="underscore"),
    pytest.param("Ünïcode 名前", id="non-ascii"),
    pytest.param("x" * 200, id="long"),
    pytest.param("@@@", id="nothing-readable"),
    pytest.param("../../etc", id="path"),
    pytest.param("a\nb:c", id="newline-colon"),
]


@pytest.mark.parametrize("hub_name", ODD)
@pytest.mark.parametrize("prefix", ["jupyter-", "dlt-", "a" * 16, ""])
def test_odd_names_map_to_valid_hashed_names(hub_name: str, prefix: str) -> None:
    name = account_name(hub_name, prefix)
    assert USERADD_NAME.fullmatch(name) and len(name) <= NAME_MAX, name
    assert name.startswith(prefix)
    assert "_" in name[len(prefix) :], "a hashed name carries '_', which plain names never do"
    assert account_name(hub_name, prefix) == name, "the same hub name always gets the same account"


def test_long_names_that_share_a_beginning_get_different_accounts() -> None:
    a, b = "x" * 40 + "a", "x" * 40 + "b"
    assert account_name(a, "jupyter-") != account_name(b, "jupyter-")


def test_a_plain_name_never_takes_a_hashed_one() -> None:
    hashed = account_name("Alice", "jupyter-")
    assert account_name(hashed.removeprefix("jupyter-"), "jupyter-") != hashed


@settings(max_examples=300, deadline=None)
@given(names=st.lists(st.text(min_size=1, max_size=80), min_size=2, max_size=20, unique=True))
def test_any_names_map_to_distinct_valid_accounts(names: list[str]) -> None:
    for prefix in ("jupyter-", ""):
        mapped = [account_name(n, prefix) for n in names]
        assert len(set(mapped)) == len(names), dict(zip(names, mapped, strict=True))
        for name in mapped:
            assert USERADD_NAME.fullmatch(name) and len(name) <= NAME_MAX, name


@pytest.mark.parametrize(
    ("prefix", "creating", "ok"),
    [
        pytest.param("jupyter-", True, True, id="default"),
        pytest.param("lab_", True, True, id="underscore"),
        pytest.param("", True, False, id="empty-when-creating"),
        pytest.param("", False, True, id="empty-for-existing-accounts"),
        pytest.param("Jupyter-", True, False, id="capital"),
        pytest.param("1lab-", True, False, id="digit-first"),
        pytest.param("-lab", True, False, id="dash-first"),
        pytest.param("a" * 17, True, False, id="too-long"),
        pytest.param("lab/", True, False, id="slash"),
    ],
)
def test_prefix_check(prefix: str, creating: bool, ok: bool) -> None:
    if ok:
        assert check_prefix(prefix, creating) == prefix
    else:
        with pytest.raises(ValueError, match="prefix"):
            check_prefix(prefix, creating)


# ----- accounts (real useradd) ---------------------------------------------------------------------------


@pytest.fixture
def test_prefix() -> Iterator[str]:
    """A prefix no real account has; every account that carries it is deleted afterwards."""
    prefix = f"dlu{secrets.token_hex(2)}-"
    yield prefix
    for entry in pwd.getpwall():
        if entry.pw_name.startswith(prefix):
            subprocess.run(["userdel", entry.pw_name], check=True, capture_output=True, timeout=30)


@as_root
async def test_concurrent_calls_make_one_account(test_prefix: str, tmp_path: Path) -> None:
    name = account_name("dora", test_prefix)
    home = str(tmp_path / "dora")
    accounts = await asyncio.gather(*(ensure_account(name, home, "/bin/bash") for _ in range(5)))
    assert len({a.uid for a in accounts}) == 1
    entries = [p for p in pwd.getpwall() if p.pw_name == name]
    assert len(entries) == 1
    entry = entries[0]
    assert entry.pw_uid >= 1000 and entry.pw_gid != 0
    assert entry.pw_dir == home and entry.pw_shell == "/bin/bash"
    assert not os.path.exists(home), "useradd must not make the home: the backend hands the workspace over"
    # Found again, not made again.
    again = await ensure_account(name, home, "/bin/bash")
    assert again == accounts[0]


@as_root
@pytest.mark.parametrize("name", ["root", "daemon"])
async def test_system_accounts_are_never_used(name: str, tmp_path: Path) -> None:
    with pytest.raises(AccountError) as e:
        await ensure_account(name, str(tmp_path), "/bin/bash")
    assert "Ask an administrator" in str(e.value) and "uid" in e.value.detail


@as_root
async def test_an_account_in_roots_group_is_never_used(test_prefix: str, tmp_path: Path) -> None:
    name = account_name("grace", test_prefix)
    await ensure_account(name, str(tmp_path / "grace"), "/bin/bash")
    subprocess.run(["usermod", "-aG", "root", name], check=True, capture_output=True, timeout=30)
    with pytest.raises(AccountError) as e:
        await ensure_account(name, str(tmp_path / "grace"), "/bin/bash")
    assert "groups" in e.value.detail


@as_root
async def test_a_missing_account_is_not_made_when_creation_is_off(test_prefix: str, tmp_path: Path) -> None:
    name = account_name("erin", test_prefix)
    with pytest.raises(AccountError, match="no account for you"):
        await ensure_account(name, str(tmp_path), "/bin/bash", create=False)
    assert name not in {p.pw_name for p in pwd.getpwall()}


# ----- handing a workspace over ------------------------------------------------------------------------------

ACCOUNT = Account(name="nobody-here", uid=54321, gid=54321, groups=(54321,), shell="/bin/bash")


@as_root
async def test_a_new_workspace_is_made_0700_for_the_account(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    await hand_over_workspace(str(workspace), ACCOUNT)
    st_ = workspace.stat()
    assert (st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode)) == (ACCOUNT.uid, ACCOUNT.gid, 0o700)


@as_root
async def test_a_root_workspace_is_handed_over_without_following_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_text("root's")
    linked = outside / "linked"
    linked.write_text("planted hard link")
    workspace = tmp_path / "ws"
    (workspace / "deep" / "er").mkdir(parents=True)
    workspace.chmod(0o755)
    (workspace / "deep" / "er" / "f.txt").write_text("mine")
    (workspace / "to-file").symlink_to(secret)
    (workspace / "to-dir").symlink_to(outside)
    (workspace / "dangling").symlink_to(tmp_path / "nowhere")
    os.link(linked, workspace / "hardlink")
    os.mkfifo(workspace / "fifo")

    await hand_over_workspace(str(workspace), ACCOUNT)

    mine = ["", "deep", "deep/er", "deep/er/f.txt", "to-file", "to-dir", "dangling", "fifo"]
    for rel in mine:
        assert os.lstat(workspace / rel).st_uid == ACCOUNT.uid, rel
    assert stat.S_IMODE(workspace.stat().st_mode) == 0o700
    for path in (outside, secret, linked):
        assert os.lstat(path).st_uid == 0, f"{path} is outside the workspace and must stay root's"
    assert os.lstat(workspace / "hardlink").st_uid == 0, "a file with another hard link is left as it is"


@as_root
async def test_a_workspace_that_is_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "ws").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        await hand_over_workspace(str(tmp_path / "ws"), ACCOUNT)
    assert (tmp_path / "elsewhere").stat().st_uid == 0


@as_root
def test_unreachable_folder_names_the_folder_in_the_way(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    (closed / "inner").mkdir(parents=True)
    program = closed / "inner" / "prog"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    let_accounts_through(tmp_path)  # pytest's own temporary folder is closed to other users
    closed.chmod(0o700)
    assert unreachable_folder(str(program), ACCOUNT, os.R_OK | os.X_OK) == str(closed)
    closed.chmod(0o711)
    assert unreachable_folder(str(program), ACCOUNT, os.R_OK | os.X_OK) is None
    program.chmod(0o700)
    assert unreachable_folder(str(program), ACCOUNT, os.R_OK | os.X_OK) == str(program)
