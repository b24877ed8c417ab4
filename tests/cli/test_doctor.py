"""Tests for ``dolab doctor`` (:mod:`dolab_spawner.cli.doctor`): each check on its own, the exit code, and the
whole command through ``main``."""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dolab_core.gpus import GpuSlot
from dolab_spawner.cli import common, doctor, main
from dolab_spawner.cli.common import mask_url
from dolab_spawner.cli.doctor import (
    MISSING,
    OK,
    WARNING,
    CheckRow,
    check_database,
    check_docker,
    check_gpus,
    check_hub,
    check_proxy,
    check_runpod,
    check_singleuser,
    doctor_exit_code,
)

from ..cli_support import INVENTORY_JSON, isolate_env, unused_url
from ..hub_double import HubDouble, serve_hub_double


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No DO-LAB, hub, RunPod or proxy variables from the outside; a private data dir; no docker engine."""
    return isolate_env(monkeypatch, tmp_path)


@pytest.fixture
def hub() -> Iterator[HubDouble]:
    with serve_hub_double() as double:
        yield double


@pytest.fixture
def closed_url() -> str:
    """A 127.0.0.1 URL where nothing listens."""
    return unused_url()


# ----- doctor rows -----------------------------------------------------------------------------------------


def no_driver() -> tuple[str, list[GpuSlot]]:
    raise RuntimeError("NVML: NVML Shared Library Not Found")


def hang() -> Any:
    time.sleep(5)


@pytest.mark.parametrize(
    ("env", "read", "status", "found_has", "todo_has"),
    [
        pytest.param({}, no_driver, MISSING, "no NVIDIA driver", "GPU profiles need the NVIDIA driver", id="no-driver"),
        pytest.param(
            {},
            lambda: ("550.54.15", [GpuSlot(0, "GPU-x", "NVIDIA H100 80GB HBM3", 79.6)]),
            OK,
            "driver 550.54.15; 0: NVIDIA H100 80GB HBM3 (79.6 GB)",
            "",
            id="driver-and-gpu",
        ),
        pytest.param({}, lambda: ("550.54.15", []), WARNING, "no GPUs", "nvidia-smi", id="driver-no-gpus"),
        pytest.param(
            {"DOLAB_GPU_INVENTORY": INVENTORY_JSON},
            no_driver,
            OK,
            "DOLAB_GPU_INVENTORY: 0: NVIDIA A100-SXM4-80GB (80 GB); 1: NVIDIA A100-SXM4-80GB (80 GB)",
            "static inventory instead of NVML",
            id="static-inventory",
        ),
        pytest.param(
            {"DOLAB_GPU_INVENTORY": "[{"},
            no_driver,
            WARNING,
            "DOLAB_GPU_INVENTORY is not valid JSON",
            "",
            id="bad-json",
        ),
        pytest.param({"DOLAB_GPU_INVENTORY": '[{"index": 0}]'}, no_driver, WARNING, "missing uuid", "", id="bad-entry"),
        pytest.param({}, hang, MISSING, "no answer in 0.2 s", "NVIDIA driver", id="hung-nvml"),
    ],
)
def test_check_gpus(env: dict[str, str], read: Callable[[], Any], status: str, found_has: str, todo_has: str) -> None:
    row = check_gpus(env, read=read, timeout_seconds=0.2)
    assert (row.part, row.status, row.required) == ("NVML and GPUs", status, False)
    assert found_has in row.found
    assert todo_has in row.todo


def test_check_gpus_no_driver_message_is_the_documented_one() -> None:
    row = check_gpus({}, read=no_driver)
    assert row.todo == (
        "GPU profiles need the NVIDIA driver; on a CPU-only box nothing to do (or set DOLAB_GPU_INVENTORY for tests)"
    )


def test_check_gpus_on_this_machine_never_raises() -> None:
    assert check_gpus(os.environ).status in (OK, MISSING, WARNING)


def docker_refused(timeout: float) -> dict[str, Any]:
    raise ConnectionError(
        "Error while fetching server API version: "
        "('Connection aborted.', FileNotFoundError(2, 'No such file or directory'))"
    )


def docker_missing(timeout: float) -> dict[str, Any]:
    raise ImportError("No module named 'docker'")


DOCKER_TODO = "Install docker.io and start dockerd to use docker profiles"


@pytest.mark.parametrize(
    ("version", "status", "found_has", "todo"),
    [
        pytest.param(
            lambda t: {"Version": "27.3.1", "ApiVersion": "1.47"}, OK, "engine 27.3.1 (API 1.47)", "", id="ok"
        ),
        pytest.param(docker_refused, MISSING, "no docker socket", DOCKER_TODO, id="no-socket"),
        pytest.param(docker_missing, MISSING, "not installed", "pip install docker", id="no-sdk"),
        pytest.param(lambda t: time.sleep(5), MISSING, "did not answer in 0.2 s", DOCKER_TODO, id="hung-socket"),
    ],
)
def test_check_docker(version: Callable[[float], Any], status: str, found_has: str, todo: str) -> None:
    started = time.monotonic()
    row = check_docker(version, timeout_seconds=0.2)
    assert time.monotonic() - started < 3
    assert (row.status, row.required, row.todo) == (status, False, todo)
    assert found_has in row.found


def test_check_docker_real_sdk_without_engine_is_missing() -> None:
    row = check_docker(timeout_seconds=2)  # DOCKER_HOST points at a socket that does not exist
    assert row.status == MISSING
    assert "dockerd" in row.todo


def script(path: Path, body: str, mode: int = 0o755) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(mode)
    return path


PROXY_TODO = "Run `make run` (installs it) or `npm install -g configurable-http-proxy@5`"


@pytest.mark.parametrize(
    ("body", "mode", "status", "found_has"),
    [
        pytest.param("echo 5.3.0", 0o755, OK, "(version 5.3.0)", id="answers"),
        pytest.param("echo broken >&2; exit 3", 0o755, MISSING, "--version failed (exit 3: broken)", id="fails"),
        pytest.param("echo 5.3.0", 0o644, MISSING, "is not an executable file", id="not-executable"),
        pytest.param("sleep 30", 0o755, WARNING, "did not answer --version in 0.5 s", id="hangs"),
    ],
)
def test_check_proxy_command(tmp_path: Path, body: str, mode: int, status: str, found_has: str) -> None:
    proxy = script(tmp_path / "chp", body, mode)
    started = time.monotonic()
    row = check_proxy({"DOLAB_PROXY_COMMAND": str(proxy)}, tmp_path, timeout_seconds=0.5)
    assert time.monotonic() - started < 5  # a hung proxy (and the sleep it forked) is killed
    assert (row.part, row.status, row.required) == ("Proxy", status, True)
    assert found_has in row.found
    if status == MISSING:
        assert row.todo == PROXY_TODO


def test_check_proxy_path_that_does_not_exist_is_missing(tmp_path: Path) -> None:
    row = check_proxy({"DOLAB_PROXY_COMMAND": str(tmp_path / "nope" / "chp")}, tmp_path)
    assert (row.status, row.required, row.todo) == (MISSING, True, PROXY_TODO)
    assert "not found" in row.found


def test_check_proxy_finds_the_one_make_run_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    bin_dir = tmp_path / ".dolab" / "node" / "node_modules" / ".bin"
    bin_dir.mkdir(parents=True)
    script(bin_dir / "configurable-http-proxy", "echo 5.0.1")
    row = check_proxy({}, tmp_path)
    assert row.status == OK
    assert row.found.startswith(str(bin_dir))


def test_check_proxy_name_not_on_path_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    row = check_proxy({"DOLAB_PROXY_COMMAND": "no-such-proxy"}, tmp_path)
    assert (row.status, row.found) == (MISSING, "no-such-proxy not found")


def sqlite_file(path: Path, *tables: str) -> Path:
    with sqlite3.connect(path) as db:
        for table in tables:
            db.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)")
    return path


def test_check_database_with_hub_tables(tmp_path: Path) -> None:
    db = sqlite_file(tmp_path / "hub.sqlite", "users", "spawners", "alembic_version")
    row = check_database({"DOLAB_DB_URL": f"sqlite:///{db}"}, str(tmp_path))
    assert (row.status, row.required) == (OK, True)
    assert row.found == f"sqlite:///{db}: connected, hub tables present"


def test_check_database_without_hub_tables(tmp_path: Path) -> None:
    db = sqlite_file(tmp_path / "other.sqlite", "notes")
    row = check_database({"DOLAB_DB_URL": f"sqlite:///{db}"}, str(tmp_path))
    assert row.status == OK
    assert "no hub tables yet" in row.found


def test_check_database_default_is_not_created_by_the_check(tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "dolab"
    row = check_database({}, str(data_dir))
    assert row.status == OK
    assert row.found == f"sqlite:///{data_dir}/jupyterhub.sqlite: not created yet (the hub creates it at first start)"
    assert not data_dir.exists()


def test_check_database_folder_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    row = check_database({"DOLAB_DB_URL": f"sqlite:///{blocker}/sub/hub.sqlite"}, str(tmp_path))
    assert (row.status, row.required) == (MISSING, True)
    assert "cannot create a file in" in row.found
    assert "DOLAB_DB_URL" in row.todo


def test_check_database_file_that_is_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    row = check_database({"DOLAB_DB_URL": f"sqlite:///{junk}"}, str(tmp_path))
    assert row.status == MISSING
    assert "not a database" in row.found


def test_check_database_never_shows_the_password(tmp_path: Path) -> None:
    # Port 1 on 127.0.0.1: refused at once (or the driver is not installed); either way, no password.
    url = "postgresql://dolab:hunter2@127.0.0.1:1/hub"
    row = check_database({"DOLAB_DB_URL": url}, str(tmp_path), timeout_seconds=5)
    assert row.status == MISSING
    assert row.found.startswith("postgresql://dolab:***@127.0.0.1:1/hub: ")
    assert "hunter2" not in repr(row)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("postgresql://dolab:s3cret@db:5432/hub", "postgresql://dolab:***@db:5432/hub", id="password"),
        pytest.param(
            "mysql+pymysql://u:p%40ss@h/db?charset=utf8", "mysql+pymysql://u:***@h/db?charset=utf8", id="encoded"
        ),
        pytest.param("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db", id="raw-at-in-password"),
        pytest.param("postgresql://dolab@db/hub", "postgresql://dolab@db/hub", id="user-only"),
        pytest.param("sqlite:////srv/dolab/jupyterhub.sqlite", "sqlite:////srv/dolab/jupyterhub.sqlite", id="sqlite"),
        pytest.param("not a url", "not a url", id="not-a-url"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_driver_errors_lose_the_password_raw_and_decoded() -> None:
    url = "postgresql://dolab:p%40ss@127.0.0.1/hub"
    message = "auth failed for dolab with p%40ss (p@ss)"
    assert common._scrub(message, url) == "auth failed for dolab with *** (***)"


@pytest.mark.parametrize(
    ("env", "status", "todo"),
    [
        pytest.param({"RUNPOD_API_KEY": "rp_secret_value"}, OK, "", id="set"),
        pytest.param({}, WARNING, "RunPod profiles need RUNPOD_API_KEY in the hub's environment", id="unset"),
        pytest.param(
            {"RUNPOD_API_KEY": ""}, WARNING, "RunPod profiles need RUNPOD_API_KEY in the hub's environment", id="empty"
        ),
    ],
)
def test_check_runpod(env: dict[str, str], status: str, todo: str) -> None:
    row = check_runpod(env)
    assert (row.part, row.status, row.todo) == ("RunPod", status, todo)
    assert "rp_secret_value" not in repr(row)


def test_check_singleuser_beside_python(tmp_path: Path) -> None:
    script(tmp_path / "jupyterhub-singleuser", "true")
    row = check_singleuser(str(tmp_path / "python"), path="")
    assert (row.status, row.found, row.required) == (OK, str(tmp_path / "jupyterhub-singleuser"), True)


def test_check_singleuser_on_path(tmp_path: Path) -> None:
    (tmp_path / "venv").mkdir()
    elsewhere = tmp_path / "bin"
    elsewhere.mkdir()
    script(elsewhere / "jupyterhub-singleuser", "true")
    row = check_singleuser(str(tmp_path / "venv" / "python"), path=str(elsewhere))
    assert (row.status, row.found) == (OK, f"{elsewhere}/jupyterhub-singleuser (on PATH)")


def test_check_singleuser_missing(tmp_path: Path) -> None:
    row = check_singleuser(str(tmp_path / "python"), path=str(tmp_path / "empty"))
    assert (row.status, row.required) == (MISSING, True)
    assert "pip install jupyterhub jupyterlab" in row.todo


def test_check_hub_answers(hub: HubDouble) -> None:
    hub.respond = lambda method, path, query, body: (200, {"version": "6.1.1"}) if path == "/hub/api" else (404, {})
    row = check_hub(hub.url + "/")
    assert (row.status, row.found) == (OK, f"JupyterHub 6.1.1 answers at {hub.url}/")
    assert [r["path"] for r in hub.requests] == ["/hub/api"]


def test_check_hub_something_else_answers(hub: HubDouble) -> None:
    hub.respond = lambda method, path, query, body: (404, b"<html>not here</html>")
    row = check_hub(hub.url)
    assert row.status == WARNING
    assert "HTTP 404" in row.found


def test_check_hub_nobody_there(closed_url: str) -> None:
    row = check_hub(closed_url)
    assert row.status == WARNING
    assert row.found == f"no hub answers at {closed_url} (Connection refused)"
    assert "DOLAB_HUB_URL" in row.todo


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        pytest.param([(OK, True), (MISSING, False), (WARNING, False)], 0, id="optional-parts-missing"),
        pytest.param([(OK, True), (MISSING, True)], 1, id="required-missing"),
        pytest.param([(OK, True), (WARNING, True)], 1, id="required-warning"),
        pytest.param([], 0, id="nothing-checked"),
    ],
)
def test_doctor_exit_code(statuses: list[tuple[str, bool]], code: int) -> None:
    rows = [CheckRow(f"part {i}", status, "found", required=req) for i, (status, req) in enumerate(statuses)]
    assert doctor_exit_code(rows) == code


def test_doctor_turns_a_crashing_check_into_a_row(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(env: Any, config_dir: Any) -> CheckRow:
        raise KeyError("surprise")

    monkeypatch.setattr(doctor, "check_proxy", boom)
    rows = doctor.doctor_rows({}, str(tmp_path), tmp_path, "http://127.0.0.1:9")
    proxy = next(r for r in rows if r.part == "Proxy")
    assert (proxy.status, proxy.required) == (WARNING, True)
    assert "surprise" in proxy.found
    assert doctor_exit_code(rows) == 1


# ----- dolab doctor ----------------------------------------------------------------------------------------


@pytest.fixture
def embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed_url: str) -> Path:
    """A machine with a working proxy and database, and no hub running."""
    proxy = script(tmp_path / "chp", "echo 5.3.0")
    monkeypatch.setenv("DOLAB_PROXY_COMMAND", str(proxy))
    monkeypatch.setenv("DOLAB_DB_URL", f"sqlite:///{sqlite_file(tmp_path / 'hub.sqlite', 'users', 'spawners')}")
    monkeypatch.setenv("DOLAB_HUB_URL", closed_url)
    return proxy


@pytest.mark.skipif(
    not (Path(sys.executable).parent / "jupyterhub-singleuser").exists(), reason="needs the project's venv"
)
def test_doctor_exits_0_when_the_embedded_default_can_run(
    embedded_default: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["part", "status", "found", "what", "to", "do"]
    for part in ("NVML and GPUs", "Docker engine", "Proxy", "Database", "RunPod", "Single-user server", "Hub"):
        assert any(line.startswith(part) for line in lines), part
    assert next(line for line in lines if line.startswith("Proxy")).split()[1] == "ok"
    assert "has what it needs" in lines[-1]


def test_doctor_exits_1_without_a_proxy(
    embedded_default: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOLAB_PROXY_COMMAND", str(tmp_path / "missing-proxy"))
    assert main(["doctor"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("Proxy")).split()[1] == "missing"
    assert lines[-1] == "The embedded default cannot run yet: see Proxy above."


def test_doctor_finds_the_hub_at_the_bind_url(
    embedded_default: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DOLAB_HUB_URL")
    monkeypatch.setenv("DOLAB_BIND_URL", hub.url)
    hub.respond = lambda method, path, query, body: (200, {"version": "6.1.1"}) if path == "/hub/api" else (404, {})
    main(["doctor"])
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("Hub")).split()[1] == "ok"
    assert [r["path"] for r in hub.requests] == ["/hub/api"]


CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    Path(doctor.__file__).resolve().parents[2] != CHECKOUT, reason="needs the package imported from this checkout"
)
def test_config_dir_falls_back_to_this_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (CHECKOUT / "jupyterhub_config.py").exists()
    monkeypatch.chdir(tmp_path)
    assert doctor._config_dir() == CHECKOUT


def test_config_dir_prefers_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "jupyterhub_config.py").write_text("")
    monkeypatch.chdir(tmp_path)
    assert doctor._config_dir() == tmp_path
