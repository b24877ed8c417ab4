"""Tests for :mod:`dolab_services.culler.registration`: how the shipped config registers the culler."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

from dolab_core.plans import plans_from_env
from dolab_services.culler.registration import CULLER_SCOPES, USER_SCOPE, culler_service

from ..cli_support import isolate_env
from .support import REPO


def test_culler_service_defaults() -> None:
    found = culler_service(Config(), {}, "/py", "/data")
    assert found is not None
    assert found.service == {
        "name": "dolab-culler",
        "command": [
            "/py",
            "-m",
            "dolab_services.culler",
            "--interval",
            "60",
            "--max-run-hours",
            "168",
            "--extensions-file",
            "/data/culler-extensions.json",
        ],
        "url": "http://127.0.0.1:10101",
        "environment": {},
        "oauth_no_confirm": True,
        # An admin's browser token carries DO-LAB's scopes the culler checks (the admin flag alone allows nothing).
        "oauth_client_allowed_scopes": ["custom:dolab:stop-servers", "custom:dolab:extend-servers"],
        "info": found.service["info"],
    }
    assert found.role == {
        "name": "dolab-culler",
        "description": found.role["description"],
        "scopes": list(CULLER_SCOPES),
        "services": ["dolab-culler"],
    }
    assert found.extra_user_scopes == {"access:services!service=dolab-culler"}


def test_culler_service_from_env_and_config(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"rules": [{"profile": "cpu", "idle_hours": 2}]}))
    c = Config()
    c.DoLabSpawner.max_run_hours = 24
    c.JupyterHub.extra_user_scopes = {"read:metrics"}
    env = {
        "DOLAB_CULLER_INTERVAL": "15",
        "DOLAB_CULLER_POLICY": str(policy),
        "DOLAB_CULLER_TELEMETRY": "file:/run/gpu.json",
        "DOLAB_CULLER_PORT": "9999",
        "DOLAB_MAX_RUN_HOURS": "48",
    }
    found = culler_service(c, env, "/py")
    assert found is not None
    assert found.service["command"][3:] == [
        "--interval",
        "15",
        "--max-run-hours",
        "24",
        "--policy",
        str(policy),
        "--telemetry",
        "file:/run/gpu.json",
    ]
    assert found.service["url"] == "http://127.0.0.1:9999"
    assert found.extra_user_scopes == {"read:metrics", USER_SCOPE}


def test_culler_service_gets_the_spawners_plans() -> None:
    plans = {"plans": {"staff": {"profiles": "*", "cull_exempt": True}}, "groups": {"lab-staff": "staff"}}
    c = Config()
    c.DoLabSpawner.plans = plans
    found = culler_service(c, {}, "/py")
    assert found is not None
    table = plans_from_env(found.service["environment"])
    assert table.plan_for(["lab-staff"]).cull_exempt
    assert not table.plan_for(["students"]).cull_exempt
    assert culler_service(Config(), {"DOLAB_MAX_RUN_HOURS": "48"}, "/py").service["command"][6] == "48"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"DOLAB_CULLER_INTERVAL": "soon"}, "must be a number", id="interval-text"),
        pytest.param({"DOLAB_CULLER_INTERVAL": "0"}, "positive number of seconds", id="interval-zero"),
        pytest.param({"DOLAB_CULLER_PORT": "70000"}, "TCP port", id="port"),
        pytest.param(
            {"DOLAB_CULLER_POLICY": "/nonexistent/policy.json"}, "Cannot read the culler policy", id="no-file"
        ),
    ],
)
def test_culler_service_errors(env: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        culler_service(Config(), env, "/py")


def test_culler_service_bad_policy_content(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"rules": [{"idle_minutes": 5}]}))
    with pytest.raises(ValueError, match=r"rules\[0\] must be a dict with keys among"):
        culler_service(Config(), {"DOLAB_CULLER_POLICY": str(policy)}, "/py")


def test_culler_service_leaves_an_admins_own_alone() -> None:
    c = Config()
    c.JupyterHub.services = [{"name": "dolab-culler", "command": ["mine"]}]
    assert culler_service(c, {}, "/py") is None


def test_shipped_config_registers_the_culler_after_the_overlays(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data_dir = isolate_env(monkeypatch, tmp_path)
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    (overlays / "10-limits.py").write_text("c.DoLabSpawner.max_run_hours = 12\n")
    monkeypatch.setenv("DOLAB_CONFIG_DIR", str(overlays))
    c = PyFileConfigLoader("jupyterhub_config.py", path=str(REPO)).load_config()
    services = {s["name"]: s for s in c.JupyterHub.services}
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    culler = services["dolab-culler"]
    assert culler["command"][:3] == [sys.executable, "-m", "dolab_services.culler"]
    assert culler["command"][5:7] == ["--max-run-hours", "12"]
    command = culler["command"]
    assert command[command.index("--extensions-file") + 1] == str(data_dir / "culler-extensions.json")
    assert roles["dolab-culler"]["scopes"] == list(CULLER_SCOPES)
    assert USER_SCOPE in c.JupyterHub.extra_user_scopes, "every user may open the culler's page"
    assert "dolab-cli" in services
