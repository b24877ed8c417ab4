"""Unit tests for dolab_core.hubconfig: the helpers behind jupyterhub_config.py."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from dolab_core.hubconfig import (
    ConfigEnvError,
    ensure_secret,
    env_float,
    env_json,
    env_list,
    find_proxy,
    generate_password,
)

PROXY = "configurable-http-proxy"


# ----- secrets ----------------------------------------------------------------------------------------------


def test_generate_password() -> None:
    password = generate_password(40)
    assert len(password) == 40
    assert password.isalnum()
    assert not set(password) & set("0O1lIio"), "no characters that are easy to mistype"
    assert generate_password() != generate_password()


def test_ensure_secret_creates_once(tmp_path: Path) -> None:
    path = tmp_path / "data" / "admin-password"
    secret, created = ensure_secret(path, length=40)
    assert created is True
    assert len(secret) == 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0, "a new data dir is private"
    assert path.read_text() == secret + "\n"

    again, created = ensure_secret(path, length=40)
    assert (again, created) == (secret, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_ensure_secret_reads_an_existing_one(tmp_path: Path) -> None:
    path = tmp_path / "shared-password"
    path.write_text("  chosen-by-admin \n")
    assert ensure_secret(path) == ("chosen-by-admin", False)


def test_ensure_secret_mode_ignores_a_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ensure_secret(tmp_path / "token")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600


def test_ensure_secret_refuses_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "admin-password"
    path.write_text("")
    try:
        secret, _ = ensure_secret(path)
    except ValueError as e:
        assert str(path) in str(e)
    else:
        assert secret


# ----- environment variables --------------------------------------------------------------------------------


def test_env_json_value() -> None:
    env = {"DOLAB_PROFILES": '[{"display_name": "CPU"}]'}
    assert env_json(env, "DOLAB_PROFILES") == [{"display_name": "CPU"}]


@pytest.mark.parametrize("env", [{}, {"DOLAB_PROFILES": ""}], ids=["unset", "empty"])
def test_env_json_default(env: dict[str, str]) -> None:
    assert env_json(env, "DOLAB_PROFILES") is None
    assert env_json(env, "DOLAB_PROFILES", default=[]) == []


def test_env_json_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.json"
    path.write_text('{"a": [1, 2]}\n')
    assert env_json({"DOLAB_PROFILES_FILE": str(path)}, "DOLAB_PROFILES") == {"a": [1, 2]}
    assert env_json({"DOLAB_PROFILES": "", "DOLAB_PROFILES_FILE": str(path)}, "DOLAB_PROFILES") == {"a": [1, 2]}
    # The variable itself wins over its _FILE.
    assert env_json({"DOLAB_PROFILES": "[]", "DOLAB_PROFILES_FILE": str(path)}, "DOLAB_PROFILES") == []


def test_env_json_bad_json_names_the_variable() -> None:
    with pytest.raises(ConfigEnvError) as info:
        env_json({"DOLAB_GPU_INVENTORY": "[{'index': 0}]"}, "DOLAB_GPU_INVENTORY")
    assert str(info.value) == (
        "DOLAB_GPU_INVENTORY is not valid JSON (Expecting property name enclosed in double quotes at line 1, column 3)"
    )
    assert isinstance(info.value, ValueError)


def test_env_json_bad_json_in_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.json"
    path.write_text("[\n  {,}\n]")
    with pytest.raises(ConfigEnvError, match=r"DOLAB_PROFILES is not valid JSON \(.* at line 2, column 4\)"):
        env_json({"DOLAB_PROFILES_FILE": str(path)}, "DOLAB_PROFILES")


def test_env_json_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigEnvError) as info:
        env_json({"DOLAB_PROFILES_FILE": str(missing)}, "DOLAB_PROFILES")
    assert str(info.value) == f"DOLAB_PROFILES_FILE={missing}: cannot read it (No such file or directory)"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ["admin"]),
        ({"DOLAB_ADMIN_USERS": ""}, []),
        ({"DOLAB_ADMIN_USERS": "alice"}, ["alice"]),
        ({"DOLAB_ADMIN_USERS": " alice, bob ,,carol , "}, ["alice", "bob", "carol"]),
    ],
    ids=["unset uses the default", "empty is no one", "one", "blanks dropped"],
)
def test_env_list(env: dict[str, str], expected: list[str]) -> None:
    default = ["admin"]
    result = env_list(env, "DOLAB_ADMIN_USERS", default)
    assert result == expected
    result.append("mallory")
    assert default == ["admin"], "the default list is not shared"


def test_env_list_without_default() -> None:
    assert env_list({}, "DOLAB_GPU_IDS") == []


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, 168.0), ({"X": ""}, 168.0), ({"X": "12"}, 12.0), ({"X": " 0.5 "}, 0.5), ({"X": "0"}, 0.0)],
    ids=["unset", "empty", "integer", "spaces", "zero"],
)
def test_env_float(env: dict[str, str], expected: float) -> None:
    assert env_float(env, "X", 168) == expected


@pytest.mark.parametrize("value", ["abc", "12h", "1,5"], ids=["word", "unit", "comma"])
def test_env_float_bad_value(value: str) -> None:
    with pytest.raises(ConfigEnvError) as info:
        env_float({"DOLAB_MAX_RUN_HOURS": value}, "DOLAB_MAX_RUN_HOURS", 168)
    assert str(info.value) == f"DOLAB_MAX_RUN_HOURS must be a number, not {value!r}"


# ----- find_proxy -------------------------------------------------------------------------------------------


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        ({"env", "npm", "python", "path"}, "env"),
        ({"npm", "python", "path"}, "npm"),
        ({"python", "path"}, "python"),
        ({"path"}, "path"),
        (set(), "bare"),
    ],
    ids=[
        "DOLAB_PROXY_COMMAND first",
        "then npm's under the config dir",
        "then beside sys.executable",
        "then PATH",
        "else the bare name",
    ],
)
def test_find_proxy_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, present: set[str], expected: str) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    npm = config_dir / ".dolab" / "node" / "node_modules" / ".bin" / PROXY
    python_bin = tmp_path / "venv" / "bin"
    beside_python = python_bin / PROXY
    path_dir = tmp_path / "on-path"
    on_path = path_dir / PROXY
    if "npm" in present:
        _executable(npm)
    if "python" in present:
        _executable(beside_python)
    if "path" in present:
        _executable(on_path)
    python_bin.mkdir(parents=True, exist_ok=True)
    path_dir.mkdir(exist_ok=True)
    monkeypatch.setattr(sys, "executable", str(python_bin / "python3"))
    monkeypatch.setenv("PATH", str(path_dir))
    env = {"PATH": str(path_dir)}
    if "env" in present:
        env["DOLAB_PROXY_COMMAND"] = "/opt/chp/bin/my-proxy"

    found = find_proxy(env, config_dir)

    assert found == [
        {
            "env": "/opt/chp/bin/my-proxy",
            "npm": str(npm),
            "python": str(beside_python),
            "path": str(on_path),
            "bare": PROXY,
        }[expected]
    ]


def test_find_proxy_empty_command_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npm = _executable(tmp_path / ".dolab" / "node" / "node_modules" / ".bin" / PROXY)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "nowhere" / "python3"))
    assert find_proxy({"DOLAB_PROXY_COMMAND": ""}, str(tmp_path)) == [str(npm)]


def test_proxy_command_with_arguments_is_split(tmp_path: Path) -> None:
    env = {"DOLAB_PROXY_COMMAND": "node '/opt/my proxy/chp.js' --log-level warn"}
    assert find_proxy(env, str(tmp_path)) == ["node", "/opt/my proxy/chp.js", "--log-level", "warn"]
