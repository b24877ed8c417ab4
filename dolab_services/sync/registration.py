"""How ``jupyterhub_config.py`` registers workspace backups (:func:`sync_service`): the ``dolab-sync`` service with
its own least-privilege role, every user's access to its API, and the spawner's hooks (final backup before a server
is destroyed, restore into a new workspace). Nothing when no target is set (``DOLAB_SYNC_S3_BUCKET``,
``DOLAB_SYNC_DRIVE_KEY_FILE``, ``DOLAB_SYNC_DRIVE_AUTH=user``). :func:`backup_before_stops` lets another service
(the culler, the monitor) have a server backed up before it stops it.

Scopes (role ``dolab-sync``, :func:`service_scopes`): ``list:users``, ``read:users:name``, ``read:servers`` and
``admin:server_state`` (which servers run, and their workspace folder from the spawner state); ``admin:auth_state``
only when a Drive target uses each user's own token (``DOLAB_SYNC_DRIVE_AUTH=user``: :mod:`.tokens`);
``tokens`` only when remote servers are backed up too (``DOLAB_SYNC_REMOTE_SERVERS``, on with RunPod): the service
reads their workspaces through their REST API at their own address (``state["server_url"]``, never through the
proxy, so a backup is not the user's activity; :mod:`.remote_hooks`), each with a token the hub mints for that one
server, owned by its user (:mod:`dolab_services.servertokens`): the pod's root never sees the service's token. Users
get ``access:services!service=dolab-sync`` to use the API, where they may also choose their target
(:mod:`.choices`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from traitlets.config import Config

from dolab_core.hubconfig import config_value

from ..registration import Registration
from ..scopes import MANAGE_BACKUPS
from .config import SECRET_ENV, SyncSettings

__all__ = [
    "AUTH_STATE_SCOPE",
    "DEFAULT_PORT",
    "DEFAULT_TRUSTED_SERVICES",
    "FINAL_SYNC_HOOK",
    "PRE_STOP_HOOK",
    "REMOTE_SCOPE",
    "RESTORE_HOOK",
    "SERVICE_NAME",
    "SYNC_SCOPES",
    "USER_SCOPE",
    "backup_before_stops",
    "service_scopes",
    "sync_service",
]

SERVICE_NAME = "dolab-sync"
SYNC_SCOPES = ("list:users", "read:users:name", "read:servers", "admin:server_state")
USER_SCOPE = f"access:services!service={SERVICE_NAME}"
#: Mint per-server tokens to read remote servers' workspaces through their REST API: only when remote servers are
#: backed up.
REMOTE_SCOPE = "tokens"
#: Read users' tokens from auth_state: only with Drive in user-token mode.
AUTH_STATE_SCOPE = "admin:auth_state"
#: The hub services that may back up any user's workspace through the API unless told otherwise
#: (``SyncService.trusted_services``).
DEFAULT_TRUSTED_SERVICES = ("dolab-culler",)
_TRUST_FLAG = "--SyncService.trusted_services="
DEFAULT_PORT = 10103
FINAL_SYNC_HOOK = "dolab_services.sync.hooks:final_sync"
RESTORE_HOOK = "dolab_services.sync.hooks:restore_new_workspace"
PRE_STOP_HOOK = "dolab_services.sync.hooks:pre_stop_final_sync"
#: boto3's own credential chain, passed on when the admin uses it instead of DOLAB_SYNC_S3_* keys.
_AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_DEFAULT_REGION",
    "AWS_CA_BUNDLE",
)


def service_scopes(settings: SyncSettings) -> list[str]:
    """The scopes the service's role needs for these settings, and no more."""
    scopes = [*SYNC_SCOPES, AUTH_STATE_SCOPE] if settings.needs_user_tokens else list(SYNC_SCOPES)
    return [*scopes, REMOTE_SCOPE] if settings.remote_servers else scopes


def sync_service(
    env: Mapping[str, str], workspace_root: str, data_dir: str, python: str = sys.executable
) -> Registration | None:
    """The service, its role, the users' scope for its API and the spawner's hooks when a target is configured;
    ValueError with a sentence for bad settings."""
    settings = SyncSettings.from_env(env)
    if not settings.enabled:
        return None
    port_text = env.get("DOLAB_SYNC_PORT", str(DEFAULT_PORT))
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"DOLAB_SYNC_PORT must be a TCP port number, not {port_text!r}")
    passed = {k: v for k, v in env.items() if k.startswith("DOLAB_SYNC_") or k in _AWS_ENV or k in SECRET_ENV}
    passed.update(DOLAB_WORKSPACE_ROOT=workspace_root, DOLAB_DATA_DIR=data_dir)
    if settings.remote_servers:
        passed["DOLAB_SYNC_REMOTE_SERVERS"] = "1"  # the service never sees RUNPOD_API_KEY
    service = {
        "name": SERVICE_NAME,
        "command": [python, "-m", "dolab_services.sync"],
        "url": f"http://127.0.0.1:{int(port_text)}",
        "environment": passed,
        "oauth_no_confirm": True,
        # What the service checks for other users' backups: a browser's token carries it when its user has it.
        "oauth_client_allowed_scopes": [MANAGE_BACKUPS],
        "display": False,
        "info": {"description": "Workspace backups: restore points and restore"},
    }
    role = {
        "name": SERVICE_NAME,
        "description": "Back up running servers' workspaces (dolab-sync)",
        "scopes": service_scopes(settings),
        "services": [SERVICE_NAME],
    }
    hooks = {"pre_destroy_hooks": [FINAL_SYNC_HOOK], "pre_start_hooks": [RESTORE_HOOK]}
    return Registration(service, role, {USER_SCOPE}, hooks)


def backup_before_stops(c: Config, sync: Registration, caller: Registration) -> None:
    """Have the hub service ``caller`` (the culler, the monitor) ask ``dolab-sync`` for a backup before it stops a
    server (a failed backup keeps the server running): its pre-stop hook, where the API is (not through the proxy),
    a role to call the API, and the sync service's trust (the culler has it by default)."""
    caller.service["command"] = [*caller.service["command"], "--pre-stop-hook", PRE_STOP_HOOK]
    where = {"DOLAB_SYNC_SERVICE_URL": f"{sync.service['url']}/services/{SERVICE_NAME}/"}
    caller.service["environment"] = {**caller.service.get("environment", {}), **where}
    role = {
        "name": f"{caller.name}-calls-{SERVICE_NAME}",
        "description": f"{caller.name} may ask {SERVICE_NAME} for a backup before it stops a server",
        "scopes": [USER_SCOPE],
        "services": [caller.name],
    }
    c.JupyterHub.load_roles = [*config_value(c, "JupyterHub", "load_roles", []), role]
    command = sync.service["command"]
    trusted = [arg[len(_TRUST_FLAG) :] for arg in command if arg.startswith(_TRUST_FLAG)] or DEFAULT_TRUSTED_SERVICES
    if caller.name not in trusted:
        # Flags replace the default list: name the services trusted so far again, then this one.
        kept = [arg for arg in command if not arg.startswith(_TRUST_FLAG)]
        sync.service["command"] = [*kept, *(f"{_TRUST_FLAG}{name}" for name in (*trusted, caller.name))]
