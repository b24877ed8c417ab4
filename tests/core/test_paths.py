"""Unit tests for dolab_core.paths: the data directory users' accounts must not read (protect_data_dir)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dolab_core.paths import protect_data_dir

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners and modes needs root")


# ----- the data directory -------------------------------------------------------------------------------------------


@pytest.fixture
def keep_umask() -> Iterator[None]:
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def make_data_dir(root: Path) -> Path:
    data = root / "data"
    (data / "logs").mkdir(parents=True)
    (data / "logs").chmod(0o755)
    for name in ("jupyterhub.sqlite", "admin-password", "monitor.sqlite"):
        (data / name).write_text("x")
        (data / name).chmod(0o644)
    return data


@as_root
def test_protect_data_dir_leaves_only_a_passage_to_the_workspaces(tmp_path: Path, keep_umask: None) -> None:
    data = make_data_dir(tmp_path)
    protect_data_dir(data, data / "workspaces")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (data, *data.iterdir())}
    assert modes == {
        "data": 0o711,
        "workspaces": 0o711,
        "logs": 0o700,
        "jupyterhub.sqlite": 0o600,
        "admin-password": 0o600,
        "monitor.sqlite": 0o600,
    }
    assert os.umask(0o077) == 0o077, "what the hub creates later is private"


@as_root
def test_protect_data_dir_with_workspaces_elsewhere_keeps_it_closed(tmp_path: Path, keep_umask: None) -> None:
    data = make_data_dir(tmp_path)
    data.chmod(0o755)
    protect_data_dir(data, tmp_path / "homes" / "ws")
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "homes" / "ws").stat().st_mode) == 0o711
