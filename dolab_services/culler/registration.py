"""How ``jupyterhub_config.py`` registers the culler: the service, its role with the fewest scopes it needs, and
every user's access to its page (:func:`culler_service`).

Scopes (role ``dolab-culler``, :data:`CULLER_SCOPES`): ``list:users``, ``read:users:name`` and
``read:users:groups`` (who, and their groups for exemptions), ``read:servers`` and ``admin:server_state`` (the
servers, their activity, options and state), ``users:activity`` (record running work), ``delete:servers`` (stop),
``tokens`` (mint, for each server whose kernels it reads, a token of that server's user limited to
``access:servers!server=<user>/<name>``: the culler's own token never reaches a user's server). Users get
``access:services!service=dolab-culler`` through ``c.JupyterHub.extra_user_scopes`` to open the page."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from traitlets.config import Config

from dolab_core.hubconfig import config_value, env_float
from dolab_core.plans import service_environment

from ..registration import Registration, registered
from ..scopes import EXTEND_SERVERS, STOP_SERVERS
from .policy import CullPolicy

__all__ = [
    "CULLER_SCOPES",
    "DEFAULT_PORT",
    "SERVICE_NAME",
    "USER_SCOPE",
    "culler_service",
    "load_policy",
]

SERVICE_NAME = "dolab-culler"
#: What the culler's token needs, and what the shipped config's ``dolab-culler`` role grants.
CULLER_SCOPES = (
    "list:users",
    "read:users:name",
    "read:users:groups",
    "read:servers",
    "admin:server_state",
    "users:activity",
    "delete:servers",
    "tokens",
)
#: What every user needs to open the culler's page and API.
USER_SCOPE = f"access:services!service={SERVICE_NAME}"
DEFAULT_PORT = 10101


def culler_service(
    config: Config, env: Mapping[str, str], python: str = sys.executable, data_dir: str | os.PathLike[str] = ""
) -> Registration | None:
    """The hub-managed ``dolab-culler`` service, its role, and ``extra_user_scopes`` with :data:`USER_SCOPE`.

    From ``DOLAB_CULLER_INTERVAL`` (seconds), ``DOLAB_CULLER_POLICY`` (a JSON file, checked now),
    ``DOLAB_CULLER_TELEMETRY`` and ``DOLAB_CULLER_PORT`` (default 10101); the extension limit is the
    spawner's ``max_run_hours``. None when the config already has a service of that name. Raises ValueError with
    a sentence for bad settings.
    """
    if registered(config, SERVICE_NAME):
        return None
    interval = env_float(env, "DOLAB_CULLER_INTERVAL", 60)
    if interval <= 0:
        raise ValueError(f"DOLAB_CULLER_INTERVAL must be a positive number of seconds, not {interval:g}")
    port = env_float(env, "DOLAB_CULLER_PORT", DEFAULT_PORT)
    if port != int(port) or not 0 < port < 65536:
        raise ValueError(f"DOLAB_CULLER_PORT must be a TCP port number, not {env.get('DOLAB_CULLER_PORT')!r}")
    default_hours = env_float(env, "DOLAB_MAX_RUN_HOURS", 168)
    max_run_hours = float(config_value(config, "DoLabSpawner", "max_run_hours", default_hours))
    command = [python, "-m", "dolab_services.culler", "--interval", f"{interval:g}"]
    command += ["--max-run-hours", f"{max_run_hours:g}"]
    policy = env.get("DOLAB_CULLER_POLICY", "")
    if policy:
        load_policy(policy)
        command += ["--policy", str(Path(policy).resolve())]
    telemetry = env.get("DOLAB_CULLER_TELEMETRY", "").strip()
    if telemetry:
        command += ["--telemetry", telemetry]
    if data_dir:
        command += ["--extensions-file", str(Path(data_dir) / "culler-extensions.json")]
    service = {
        "name": SERVICE_NAME,
        "command": command,
        "url": f"http://127.0.0.1:{int(port)}",
        # Plans with cull_exempt and max_run_hours: the spawner's plans, read the same way.
        "environment": service_environment(config_value(config, "DoLabSpawner", "plans", None)),
        "oauth_no_confirm": True,
        # What the culler checks for other users' servers: a browser's token carries them when its user has them.
        "oauth_client_allowed_scopes": [STOP_SERVERS, EXTEND_SERVERS],
        "info": {"description": "Your servers' stop times and warnings; extend a stop time"},
    }
    role = {
        "name": SERVICE_NAME,
        "description": "Keep running work alive, stop idle or expired servers (dolab-culler)",
        "scopes": list(CULLER_SCOPES),
        "services": [SERVICE_NAME],
    }
    scopes = set(config_value(config, "JupyterHub", "extra_user_scopes", set()) or ()) | {USER_SCOPE}
    return Registration(service, role, scopes)


def load_policy(path: str) -> CullPolicy:
    """The policy in a JSON file (:meth:`CullPolicy.from_config`); ValueError with a sentence."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"Cannot read the culler policy {path} ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"The culler policy {path} is not valid JSON ({e})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"The culler policy {path} must be a JSON object")
    return CullPolicy.from_config(data)
