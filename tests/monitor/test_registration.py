"""The monitor's registration in the shipped config, and the spawner's quota check against a monitor double."""

from __future__ import annotations

import json
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from jupyterhub.spawner import SpawnException
from traitlets.config import Config, PyFileConfigLoader

from dolab_core.plans import plans_from_env
from dolab_services.monitor.quotacheck import MonitorQuotaCheck, is_metered
from dolab_services.monitor.registration import MONITOR_SCOPES, USER_SCOPE, monitor_service

from ..cli_support import isolate_env
from ..hub_double import HubDouble, serve_hub_double

REPO = Path(__file__).resolve().parents[2]


def test_defaults(tmp_path: Path) -> None:
    found = monitor_service(Config(), {}, "/py", tmp_path)
    assert found is not None
    assert found.service["command"] == [
        "/py",
        "-m",
        "dolab_services.monitor",
        "--interval",
        "15",
        "--warn-percent",
        "90",
        "--db-url",
        f"sqlite:///{tmp_path / 'monitor.sqlite'}",
    ]
    assert found.service["url"] == "http://127.0.0.1:10102"
    token_file = tmp_path / "monitor-token"
    assert found.service["api_token"] == token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert found.role["scopes"] == list(MONITOR_SCOPES) and "admin" not in found.role
    assert found.extra_user_scopes == {USER_SCOPE}
    assert "quota_check" not in found.spawner_settings, "no quotas: the spawner asks nothing"


def test_from_env(tmp_path: Path) -> None:
    quotas = tmp_path / "quotas.json"
    quotas.write_text(json.dumps({"default": {"usd": {"month": 50}}}))
    c = Config()
    c.JupyterHub.extra_user_scopes = {"access:services!service=dolab-culler"}
    env = {
        "DOLAB_MONITOR_INTERVAL": "5",
        "DOLAB_MONITOR_PORT": "9998",
        "DOLAB_MONITOR_TELEMETRY": "file:/run/gpus.json",
        "DOLAB_MONITOR_QUOTAS_FILE": str(quotas),
        "DOLAB_MONITOR_GPU_PRICES": '{"A100": 1.5}',
        "DOLAB_MONITOR_WARN_PERCENT": "80",
        "DOLAB_MONITOR_PER_USER_METRICS": "1",
        "DOLAB_MONITOR_DB_URL": "postgresql://dolab:secret@db/ledger",
        "DOLAB_MONITOR_FAIL_CLOSED": "1",
    }
    found = monitor_service(c, env, "/py", tmp_path)
    assert found is not None
    command = found.service["command"]
    assert command[3:] == [
        "--interval",
        "5",
        "--warn-percent",
        "80",
        "--quotas-file",
        str(quotas),
        "--telemetry",
        "file:/run/gpus.json",
        "--per-user-metrics",
    ]
    assert "secret" not in " ".join(command), "a database password stays out of the command line"
    assert found.service["environment"] == {
        "DOLAB_MONITOR_GPU_PRICES": '{"A100": 1.5}',
        "DOLAB_MONITOR_DB_URL": "postgresql://dolab:secret@db/ledger",
    }
    assert found.extra_user_scopes == {"access:services!service=dolab-culler", USER_SCOPE}
    check = found.spawner_settings["quota_check"]
    assert isinstance(check, MonitorQuotaCheck)
    assert check.url == "http://127.0.0.1:9998/services/dolab-monitor/" and check.fail_closed
    assert found.service["api_token"] not in repr(check)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DOLAB_MONITOR_INTERVAL": "0"}, "positive number of seconds"),
        ({"DOLAB_MONITOR_PORT": "70000"}, "must be a TCP port number"),
        ({"DOLAB_MONITOR_WARN_PERCENT": "120"}, "between 0 and 100"),
        ({"DOLAB_MONITOR_GPU_PRICES": "{"}, "DOLAB_MONITOR_GPU_PRICES is not valid JSON"),
        ({"DOLAB_MONITOR_GPU_PRICES": '{"A100": -2}'}, "must be 0 or more USD per GPU-hour"),
        ({"DOLAB_MONITOR_QUOTAS": '{"users": {"a": {"usd": {"year": 1}}}}'}, "unknown period 'year'"),
        ({"DOLAB_MONITOR_QUOTAS_FILE": "/nonexistent/quotas.json"}, "Cannot read the quotas file"),
    ],
    ids=["interval", "port", "warn", "prices-json", "prices-negative", "quotas-period", "quotas-file"],
)
def test_bad_settings_stop_the_hub_with_a_sentence(env: dict[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        monitor_service(Config(), env, "/py", tmp_path)
    assert message in str(e.value)


def test_plans_with_quotas_reach_the_monitor_and_switch_the_check_on(tmp_path: Path) -> None:
    c = Config()
    c.DoLabSpawner.plans = {
        "plans": {"gpu": {"profiles": "*", "quotas": {"gpu_hours": {"week": 40}}}},
        "groups": {"lab": "gpu"},
    }
    found = monitor_service(c, {}, "/py", tmp_path)
    assert found is not None and found.spawner_settings.get("quota_check") is not None
    assert plans_from_env(found.service["environment"]).plan_for(["lab"]).quotas == {"gpu_hours": {"week": 40.0}}
    c.DoLabSpawner.plans = {"plans": {"cpu": {"profiles": ["cpu"]}}, "groups": {"lab": "cpu"}}
    found = monitor_service(c, {}, "/py", tmp_path)
    assert found is not None and "quota_check" not in found.spawner_settings, "plans without quotas: nothing to check"


def test_an_admins_own_monitor_service_is_left_alone(tmp_path: Path) -> None:
    c = Config()
    c.JupyterHub.services = [{"name": "dolab-monitor", "url": "http://127.0.0.1:1"}]
    assert monitor_service(c, {}, "/py", tmp_path) is None


def load_shipped_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Config:
    isolate_env(monkeypatch, tmp_path)
    monkeypatch.setenv("DOLAB_CONFIG_DIR", str(tmp_path / "no-overlays"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return PyFileConfigLoader("jupyterhub_config.py", path=str(REPO)).load_config()


def test_the_shipped_config_registers_the_monitor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    quotas = tmp_path / "quotas.json"
    quotas.write_text(json.dumps({"default": {"gpu_hours": {"day": 4}}}))
    c = load_shipped_config(monkeypatch, tmp_path, DOLAB_MONITOR_QUOTAS_FILE=str(quotas))
    services = {s["name"]: s for s in c.JupyterHub.services}
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert services["dolab-monitor"]["command"][:3] == [sys.executable, "-m", "dolab_services.monitor"]
    assert roles["dolab-monitor"]["scopes"] == list(MONITOR_SCOPES)
    assert USER_SCOPE in c.JupyterHub.extra_user_scopes
    assert "access:services!service=dolab-culler" in c.JupyterHub.extra_user_scopes, "the culler's page stays open"
    assert isinstance(c.DoLabSpawner.quota_check, MonitorQuotaCheck)
    assert "--pre-stop-hook" not in services["dolab-monitor"]["command"], "no backup service, no hook"


def test_with_backups_a_quota_stop_backs_the_server_up_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    c = load_shipped_config(monkeypatch, tmp_path, DOLAB_SYNC_S3_BUCKET="backups")
    services = {s["name"]: s for s in c.JupyterHub.services}
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    monitor = services["dolab-monitor"]
    command = monitor["command"]
    assert command[command.index("--pre-stop-hook") + 1] == "dolab_services.sync.hooks:pre_stop_final_sync"
    assert monitor["environment"]["DOLAB_SYNC_SERVICE_URL"].endswith("/services/dolab-sync/")
    assert "dolab-monitor-calls-dolab-sync" in roles
    sync = services["dolab-sync"]["command"]
    assert (
        "--SyncService.trusted_services=dolab-monitor" in sync and "--SyncService.trusted_services=dolab-culler" in sync
    )


# ----- the spawner's quota check -------------------------------------------------------------------------------


def selection(gpus: int, backend: str = "local") -> Any:
    return SimpleNamespace(gpus=gpus, profile=SimpleNamespace(backend=backend))


def spawner(name: str = "quinn") -> Any:
    return SimpleNamespace(user=SimpleNamespace(name=name))


@pytest.fixture
def monitor() -> Iterator[HubDouble]:
    with serve_hub_double() as double:
        yield double


def answer(allowed: bool, message: str) -> Any:
    def respond(method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        return 200, {"user": "quinn", "allowed": allowed, "message": message}

    return respond


def test_what_is_metered() -> None:
    assert is_metered(selection(1)) and is_metered(selection(0, "runpod"))
    assert not is_metered(selection(0)) and not is_metered(selection(0, "docker"))


async def test_a_used_up_quota_refuses_the_spawn_with_the_monitors_sentence(monitor: HubDouble) -> None:
    monitor.respond = answer(False, "Your GPU quota is used up: 21.00 USD of 20 USD today (user quinn).")
    check = MonitorQuotaCheck(monitor.url + "/services/dolab-monitor/", "the-token")
    with pytest.raises(SpawnException) as e:
        await check(spawner(), selection(1))
    assert e.value.status_code == 403 and e.value.reason == "quota"
    assert e.value.message.startswith("Your GPU quota is used up")
    [request] = monitor.requests
    assert request["path"] == "/services/dolab-monitor/api/quota/quinn"
    assert request["headers"]["Authorization"] == "token the-token"


async def test_an_allowed_or_unmetered_spawn_goes_on(monitor: HubDouble) -> None:
    monitor.respond = answer(True, "5 USD of your 20 USD left today.")
    check = MonitorQuotaCheck(monitor.url + "/services/dolab-monitor/", "t")
    await check(spawner(), selection(1))
    await check(spawner(), selection(0))  # a CPU server: the monitor is not even asked
    assert len(monitor.requests) == 1


@pytest.mark.parametrize("failure", ["status", "json", "shape", "down"])
async def test_a_monitor_that_cannot_answer(monitor: HubDouble, failure: str, caplog: pytest.LogCaptureFixture) -> None:
    replies = {"status": (502, {"message": "bad gateway"}), "json": (200, b"<html>"), "shape": (200, {"ok": 1})}
    url = monitor.url + "/services/dolab-monitor/"
    if failure == "down":
        url = "http://127.0.0.1:9/services/dolab-monitor/"  # the discard port: nothing listens
    else:
        monitor.respond = lambda *args: replies[failure]
    # Fail open (the default): the spawn goes on and the hub logs why; the monitor books the run from its start.
    await MonitorQuotaCheck(url, "t", timeout_seconds=2)(spawner(), selection(1))
    assert "Quota of quinn cannot be checked" in caplog.text and "allowing the spawn" in caplog.text
    # Fail closed: refused with a sentence.
    with pytest.raises(SpawnException) as e:
        await MonitorQuotaCheck(url, "t", timeout_seconds=2, fail_closed=True)(spawner(), selection(1))
    assert e.value.status_code == 503
    assert e.value.message.startswith("Your GPU quota cannot be checked right now")
