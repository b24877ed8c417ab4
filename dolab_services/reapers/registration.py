"""How ``jupyterhub_config.py`` registers the reapers: ``dolab-reaper`` when a profile uses the docker backend
(:func:`reaper_service`), ``dolab-runpod-reaper`` when one uses runpod (:func:`runpod_reaper_service`).

Scopes (roles ``dolab-reaper`` and ``dolab-runpod-reaper``, least privilege): ``list:users``, ``read:users:name``,
``read:servers`` and ``admin:server_state`` (a server's state names its container or pod). They need no right on
servers: they remove containers through the Docker engines and terminate pods through RunPod, never through the hub.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

from traitlets.config import Config

from dolab_core.engines.docker import check_docker_hosts
from dolab_core.hubconfig import config_value, env_float
from dolab_core.hubidentity import HUB_ID_ENV, hub_id

from ..registration import Registration, registered

__all__ = [
    "DEFAULT_HOSTS",
    "REAPER_NAME",
    "REAPER_SCOPES",
    "RUNPOD_REAPER_NAME",
    "RUNPOD_REAPER_SCOPES",
    "reaper_service",
    "runpod_reaper_service",
]

REAPER_NAME = "dolab-reaper"
RUNPOD_REAPER_NAME = "dolab-runpod-reaper"
#: What the Docker reaper's token needs, and what the shipped config's ``dolab-reaper`` role grants.
REAPER_SCOPES = ("list:users", "read:users:name", "read:servers", "admin:server_state")
#: What the RunPod reaper's token needs, and what the shipped config's ``dolab-runpod-reaper`` role grants.
RUNPOD_REAPER_SCOPES = ("list:users", "read:users:name", "read:servers", "admin:server_state")
DEFAULT_HOSTS = [{"name": "local"}]


def _uses_backend(config: Config, backend: str) -> bool:
    """Whether a listed profile uses ``backend`` (a callable profile_list cannot be read here: no)."""
    profiles = config_value(config, "DoLabSpawner", "profile_list", [])
    if not isinstance(profiles, (list, tuple)):
        return False
    return any(isinstance(p, Mapping) and p.get("backend") == backend for p in profiles)


def _role(name: str, description: str, scopes: tuple[str, ...]) -> dict[str, Any]:
    return {"name": name, "description": description, "scopes": list(scopes), "services": [name]}


def reaper_service(config: Config, env: Mapping[str, str], python: str = sys.executable) -> Registration | None:
    """The hub-managed ``dolab-reaper`` and its role, when a profile of ``DoLabSpawner.profile_list`` uses docker.

    From ``DOLAB_REAPER_INTERVAL`` (seconds, default 600) and ``DOLAB_REAPER_REMOVE`` (``1``: remove orphans).
    None when no listed profile uses docker, or when the config already has a service named ``dolab-reaper``.
    Raises ValueError with a sentence for bad ``docker_hosts`` or env.
    """
    if not _uses_backend(config, "docker") or registered(config, REAPER_NAME):
        return None
    hosts = check_docker_hosts(config_value(config, "DoLabSpawner", "docker_hosts", DEFAULT_HOSTS))
    interval = env_float(env, "DOLAB_REAPER_INTERVAL", 600)
    if interval <= 0:
        raise ValueError(f"DOLAB_REAPER_INTERVAL must be a positive number of seconds, not {interval:g}")
    command = [python, "-m", "dolab_services.reapers", "docker", "--interval", f"{interval:g}"]
    if env.get("DOLAB_REAPER_REMOVE") == "1":
        command.append("--remove")
    # The hub's own id (the one its containers carry), read here, in the hub's process.
    environment = {"DOLAB_DOCKER_HOSTS": json.dumps(hosts), HUB_ID_ENV: hub_id(env)}
    # A managed service keeps none of the hub's environment: pass on what the hub's engine without url uses.
    environment.update({k: env[k] for k in ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH") if env.get(k)})
    service = {"name": REAPER_NAME, "command": command, "environment": environment}
    description = "Find DO-LAB containers no server owns (read servers and their state)"
    return Registration(service, _role(REAPER_NAME, description, REAPER_SCOPES))


def runpod_reaper_service(config: Config, env: Mapping[str, str], python: str = sys.executable) -> Registration | None:
    """The hub-managed ``dolab-runpod-reaper`` and its role, when a listed profile uses the runpod backend.

    From ``DOLAB_RUNPOD_REAPER_INTERVAL`` (seconds, default 600) and ``DOLAB_RUNPOD_REAPER_TERMINATE`` (``1``:
    terminate orphans). None when no listed profile uses runpod, with ``DOLAB_RUNPOD_REAPER=0``, or when the config
    already has a service of that name. Raises ValueError with a sentence for a bad interval.
    """
    if env.get("DOLAB_RUNPOD_REAPER") == "0":
        return None
    if not _uses_backend(config, "runpod") or registered(config, RUNPOD_REAPER_NAME):
        return None
    interval = env_float(env, "DOLAB_RUNPOD_REAPER_INTERVAL", 600)
    if interval <= 0:
        raise ValueError(f"DOLAB_RUNPOD_REAPER_INTERVAL must be a positive number of seconds, not {interval:g}")
    prefix = config_value(config, "RunPodBackend", "pod_name_prefix", "dolab-")
    command = [python, "-m", "dolab_services.reapers", "runpod", "--interval", f"{interval:g}", "--prefix", prefix]
    if env.get("DOLAB_RUNPOD_REAPER_TERMINATE") == "1":
        command.append("--terminate")
    # A managed service keeps none of the hub's environment: the key (hub side only), the API's address, and the
    # hub's id (the one its pod names carry), read here, in the hub's process.
    key = config_value(config, "RunPodBackend", "api_key", "") or env.get("RUNPOD_API_KEY", "")
    environment = {"RUNPOD_API_KEY": key, HUB_ID_ENV: hub_id(env)}
    if env.get("RUNPOD_API_BASE_URL"):
        environment["RUNPOD_API_BASE_URL"] = env["RUNPOD_API_BASE_URL"]
    service = {"name": RUNPOD_REAPER_NAME, "command": command, "environment": environment}
    description = "Find DO-LAB RunPod pods no server owns (read servers and their state)"
    return Registration(service, _role(RUNPOD_REAPER_NAME, description, RUNPOD_REAPER_SCOPES))
