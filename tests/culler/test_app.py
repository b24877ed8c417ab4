"""Tests for :mod:`dolab_services.culler.app`: the ``dolab-culler`` command, its flags and settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from dolab_services.culler.app import Culler

from ..cli_support import unused_url
from .support import REPO, Lab, ago


def test_the_flags() -> None:
    app = Culler()
    app.initialize(
        [
            "--interval=5",
            "--concurrency=3",
            "--telemetry=file:/x.json",
            "--max-run-hours=12",
            "--pre-stop-hook=a.b:c",
            "--pre-stop-hook=d.e:f",
            "--dry-run",
        ]
    )
    assert (app.interval_seconds, app.concurrency, app.telemetry, app.max_run_hours) == (5, 3, "file:/x.json", 12)
    assert app.pre_stop_hooks == ["a.b:c", "d.e:f"]
    assert app.dry_run is True


def test_max_run_hours_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOLAB_MAX_RUN_HOURS", "36")
    app = Culler()
    app.initialize([])
    assert app.max_run_hours == 36


def command_env(hub_url: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "DOLAB_"))}
    if hub_url:
        env.update(JUPYTERHUB_API_URL=hub_url, JUPYTERHUB_API_TOKEN="culler-token")
    return env


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--interval", "0"], "--interval must be a positive number", id="zero-interval"),
        pytest.param(["--policy", "/nonexistent.json"], "Cannot read the culler policy", id="no-policy"),
        pytest.param(["--telemetry", "file:"], "names no file", id="bad-telemetry"),
        pytest.param(["--pre-stop-hook", "nope"], "module.path:callable", id="bad-hook"),
        pytest.param([], "JUPYTERHUB_API_URL", id="no-hub"),
    ],
)
def test_the_command_refuses_bad_settings(args: list[str], message: str) -> None:
    env = command_env("http://127.0.0.1:1/hub/api" if args else "")
    command = [sys.executable, "-m", "dolab_services.culler", "--once", *args]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("dolab-culler: ") and message in done.stderr
    assert "Traceback" not in done.stderr


def test_the_command_sweeps_once(lab: Lab) -> None:
    lab.add("idle", last_activity=ago(3 * 86400))
    command = [sys.executable, "-m", "dolab_services.culler", "--once", "--telemetry", "file:/nonexistent.json"]
    done = subprocess.run(
        command, env=command_env(lab.hub.api_url), cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Stopped server idle/, reason idle" in done.stderr
    assert lab.stops() == ["idle"]


def test_the_command_reports_an_unreadable_hub() -> None:
    command = [sys.executable, "-m", "dolab_services.culler", "--once"]
    done = subprocess.run(
        command, env=command_env(unused_url() + "/hub/api"), cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "Cannot list the hub's servers" in done.stderr


def test_a_taken_port_leaves_the_page_off_but_culling_on(lab: Lab) -> None:
    lab.add("idle", last_activity=ago(3 * 86400))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **command_env(lab.hub.api_url),
            "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{taken.getsockname()[1]}",
            "JUPYTERHUB_SERVICE_PREFIX": "/services/dolab-culler/",
            "JUPYTERHUB_CLIENT_ID": "service-dolab-culler",
        }
        command = [sys.executable, "-m", "dolab_services.culler", "--interval", "0.5", "--telemetry", "file:/x.json"]
        with pytest.raises(subprocess.TimeoutExpired) as ended:
            subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=6)
    stderr = ended.value.stderr
    stderr = stderr.decode() if isinstance(stderr, bytes) else stderr or ""
    assert "the page and API are off, sweeps go on" in stderr
    assert "Stopped server idle/, reason idle" in stderr
    assert lab.stops() == ["idle"]
