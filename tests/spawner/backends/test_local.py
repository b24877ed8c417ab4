"""Unit tests for dolab_spawner.backends.local: the start-up check of the shipped config (check_local_accounts).

Run as root (see tests/spawner/backends/test_system_users.py)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from traitlets.config import Config

from dolab_spawner.backends.local import check_local_accounts
from tests.core.test_paths import make_data_dir
from tests.spawner.backends.test_system_users import as_root


@pytest.fixture
def keep_umask() -> Iterator[None]:
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def hub_config(**local: object) -> Config:
    c = Config()
    for key, value in local.items():
        setattr(c.LocalProcessBackend, key, value)
    return c


@as_root
def test_root_servers_without_the_opt_in_stop_the_hub(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="would run as root"):
        check_local_accounts(hub_config(system_users=False), tmp_path / "data", tmp_path / "data" / "ws")


@as_root
def test_root_servers_with_the_opt_in_warn(tmp_path: Path) -> None:
    warning = check_local_accounts(hub_config(allow_root_servers=True), tmp_path / "data", tmp_path / "data" / "ws")
    assert warning is not None and warning.startswith("WARNING") and "root" in warning


@as_root
def test_accounts_by_default_protect_the_data_dir(tmp_path: Path, keep_umask: None) -> None:
    data = make_data_dir(tmp_path)
    # A server program every account reaches: no warning.
    assert check_local_accounts(hub_config(cmd=["/usr/bin/env"]), data, data / "workspaces") is None
    assert stat.S_IMODE((data / "admin-password").stat().st_mode) == 0o600


@as_root
def test_a_server_program_accounts_cannot_reach_is_said_at_start(tmp_path: Path, keep_umask: None) -> None:
    data = make_data_dir(tmp_path)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    program = private / "jupyterhub-singleuser"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    warning = check_local_accounts(hub_config(cmd=[str(program)]), data, data / "workspaces")
    assert warning is not None and warning.startswith("WARNING: users' accounts cannot reach")
    assert str(program) in warning and "chmod o+x" in warning and "will not start" in warning


def test_a_bad_prefix_stops_the_hub(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prefix"):
        check_local_accounts(hub_config(system_user_prefix="Root"), tmp_path, tmp_path / "ws")
