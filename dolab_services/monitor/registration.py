"""How ``jupyterhub_config.py`` registers the monitor (:func:`monitor_service`): the ``dolab-monitor`` service, its
role with the fewest scopes it needs, every user's access to its page, and the spawner's quota check.

Scopes (role ``dolab-monitor``, :data:`MONITOR_SCOPES`): ``list:users``, ``read:users:name`` and
``read:users:groups`` (who, and their groups for group quotas), ``read:servers`` and ``admin:server_state`` (the
servers and what their state says they hold and cost), ``delete:servers`` (quota stops). Users get
``access:services!service=dolab-monitor`` through ``c.JupyterHub.extra_user_scopes`` to open the page.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from traitlets.config import Config

from dolab_core.hubconfig import config_value, env_float
from dolab_core.plans import parse_plans, service_environment

from ..registration import Registration, registered
from ..scopes import READ_USAGE
from .quotas import QuotaConfig
from .runs import GpuPrices

__all__ = ["DEFAULT_PORT", "MONITOR_SCOPES", "SERVICE_NAME", "USER_SCOPE", "load_quotas", "monitor_service"]

SERVICE_NAME = "dolab-monitor"
#: What the monitor's token needs, and what the shipped config's ``dolab-monitor`` role grants.
MONITOR_SCOPES = (
    "list:users",
    "read:users:name",
    "read:users:groups",
    "read:servers",
    "admin:server_state",
    "delete:servers",
)
USER_SCOPE = f"access:services!service={SERVICE_NAME}"
DEFAULT_PORT = 10102


def load_quotas(path: str) -> QuotaConfig:
    """The quotas in a JSON file; ValueError with a sentence."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"Cannot read the quotas file {path} ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"The quotas file {path} is not valid JSON ({e})") from None
    return QuotaConfig.from_config(data)


def _command(env: Mapping[str, str], python: str, data_dir: str | os.PathLike[str]) -> tuple[list[str], dict[str, str]]:
    """The service's command and environment from the ``DOLAB_MONITOR_*`` settings, each checked now."""
    from dolab_core.hubconfig import ConfigEnvError, env_json

    interval = env_float(env, "DOLAB_MONITOR_INTERVAL", 15)
    if interval <= 0:
        raise ValueError(f"DOLAB_MONITOR_INTERVAL must be a positive number of seconds, not {interval:g}")
    warn = env_float(env, "DOLAB_MONITOR_WARN_PERCENT", 90)
    if not 0 < warn <= 100:
        raise ValueError(f"DOLAB_MONITOR_WARN_PERCENT must be between 0 and 100, not {warn:g}")
    try:
        prices = env_json(env, "DOLAB_MONITOR_GPU_PRICES")
        GpuPrices.from_config(prices)
    except ConfigEnvError as e:
        raise ValueError(str(e)) from None
    command = [python, "-m", "dolab_services.monitor", "--interval", f"{interval:g}", "--warn-percent", f"{warn:g}"]
    environment: dict[str, str] = {}
    if prices:
        environment["DOLAB_MONITOR_GPU_PRICES"] = json.dumps(prices)
    quotas_file = env.get("DOLAB_MONITOR_QUOTAS_FILE", "").strip()
    quotas_text = env.get("DOLAB_MONITOR_QUOTAS", "").strip()
    if quotas_text:
        try:
            QuotaConfig.from_config(json.loads(quotas_text))
        except ValueError as e:
            raise ValueError(f"DOLAB_MONITOR_QUOTAS: {e}") from None
        environment["DOLAB_MONITOR_QUOTAS"] = quotas_text
    elif quotas_file:
        load_quotas(quotas_file)
        command += ["--quotas-file", str(Path(quotas_file).resolve())]
    telemetry = env.get("DOLAB_MONITOR_TELEMETRY", "").strip()
    if telemetry:
        command += ["--telemetry", telemetry]
    db_url = env.get("DOLAB_MONITOR_DB_URL", "").strip()
    if db_url:
        environment["DOLAB_MONITOR_DB_URL"] = db_url  # in the environment: a password must not show in `ps`
    elif data_dir:
        command += ["--db-url", f"sqlite:///{Path(data_dir) / 'monitor.sqlite'}"]
    if env.get("DOLAB_MONITOR_PER_USER_METRICS", "") in ("1", "true", "yes"):
        command.append("--per-user-metrics")
    return command, environment


def monitor_service(
    config: Config, env: Mapping[str, str], python: str = sys.executable, data_dir: str | os.PathLike[str] = ""
) -> Registration | None:
    """The hub-managed ``dolab-monitor`` service, its role, ``extra_user_scopes`` and the spawn-time quota check.

    From ``DOLAB_MONITOR_PORT`` (default 10102), ``DOLAB_MONITOR_INTERVAL`` (15 s), ``DOLAB_MONITOR_TELEMETRY``,
    ``DOLAB_MONITOR_DB_URL`` (default: SQLite in the data directory), ``DOLAB_MONITOR_QUOTAS`` (JSON) or
    ``DOLAB_MONITOR_QUOTAS_FILE`` (checked now; the service reads the file again when it changes),
    ``DOLAB_MONITOR_GPU_PRICES`` (JSON), ``DOLAB_MONITOR_WARN_PERCENT`` (90), ``DOLAB_MONITOR_PER_USER_METRICS``
    and ``DOLAB_MONITOR_FAIL_CLOSED`` (``1``: refuse GPU spawns while the monitor cannot be asked). The service's
    token is kept in ``<data dir>/monitor-token``: the hub's quota check sends it (``spawner_settings`` holds
    ``quota_check`` when quotas are configured). None when the config already has a service of that name. Raises
    ValueError with a sentence for bad settings.
    """
    from dolab_core.hubconfig import ensure_secret

    from .quotacheck import MonitorQuotaCheck

    if registered(config, SERVICE_NAME):
        return None
    port = env_float(env, "DOLAB_MONITOR_PORT", DEFAULT_PORT)
    if port != int(port) or not 0 < port < 65536:
        raise ValueError(f"DOLAB_MONITOR_PORT must be a TCP port number, not {env.get('DOLAB_MONITOR_PORT')!r}")
    command, environment = _command(env, python, data_dir)
    quotas_configured = bool(
        env.get("DOLAB_MONITOR_QUOTAS", "").strip() or env.get("DOLAB_MONITOR_QUOTAS_FILE", "").strip()
    )
    plans = config_value(config, "DoLabSpawner", "plans", None)
    environment.update(service_environment(plans))
    plan_quotas = not QuotaConfig(plans=parse_plans(plans)).empty
    token = ensure_secret(Path(data_dir) / "monitor-token", length=40)[0] if data_dir else ""
    url = f"http://127.0.0.1:{int(port)}"
    service: dict[str, Any] = {
        "name": SERVICE_NAME,
        "command": command,
        "url": url,
        "oauth_no_confirm": True,
        # What the monitor checks for other users' usage: a browser's token carries it when its user has it.
        "oauth_client_allowed_scopes": [READ_USAGE],
        "environment": environment,
        "info": {"description": "GPU use, spend and quotas"},
    }
    if token:
        service["api_token"] = token
    role = {
        "name": SERVICE_NAME,
        "description": "GPU and cost telemetry, usage ledger and quota stops (dolab-monitor)",
        "scopes": list(MONITOR_SCOPES),
        "services": [SERVICE_NAME],
    }
    scopes = set(config_value(config, "JupyterHub", "extra_user_scopes", set()) or ()) | {USER_SCOPE}
    spawner_settings: dict[str, Any] = {}
    if (quotas_configured or plan_quotas) and token:
        spawner_settings["quota_check"] = MonitorQuotaCheck(
            f"{url}/services/{SERVICE_NAME}/",
            token,
            fail_closed=env.get("DOLAB_MONITOR_FAIL_CLOSED", "") in ("1", "true", "yes"),
        )
    return Registration(service, role, scopes, spawner_settings)
