"""How ``jupyterhub_config.py`` registers workspace backups (:func:`sync_service`): the ``dolab-sync`` service with
its own least-privilege role, every user's access to its API, and the spawner's hooks (final backup before a server
is destroyed, restore into a new workspace). Nothing when no target is set (``DOLAB_SYNC_S3_BUCKET``,
``DOLAB_SYNC_DRIVE_KEY_FILE``, ``DOLAB_SYNC_DRIVE_AUTH=user``)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..scopes import MANAGE_BACKUPS
from .config import SECRET_ENV, SyncSettings
from .service import SERVICE_NAME, USER_SCOPE, service_scopes

__all__ = ["DEFAULT_PORT", "FINAL_SYNC_HOOK", "PRE_STOP_HOOK", "RESTORE_HOOK", "SyncRegistration", "sync_service"]

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


@dataclass(frozen=True)
class SyncRegistration:
    """What the shipped config adds."""

    service: dict[str, Any]
    role: dict[str, Any]
    user_scope: str
    pre_destroy_hook: str = FINAL_SYNC_HOOK
    pre_start_hook: str = RESTORE_HOOK
    culler_hook: str = PRE_STOP_HOOK

    @property
    def caller_environment(self) -> dict[str, str]:
        """What a service calling the sync API needs in its environment: where the API is (not through the proxy)."""
        return {"DOLAB_SYNC_SERVICE_URL": f"{self.service['url']}/services/{SERVICE_NAME}/"}

    def caller_role(self, service_name: str) -> dict[str, Any]:
        """A role letting the hub service ``service_name`` call the sync API (it must also be trusted by the
        service: ``SyncService.trusted_services``, the culler by default)."""
        return {
            "name": f"{service_name}-calls-{SERVICE_NAME}",
            "description": f"{service_name} may ask {SERVICE_NAME} for a backup before it stops a server",
            "scopes": [USER_SCOPE],
            "services": [service_name],
        }


def sync_service(
    env: Mapping[str, str], workspace_root: str, data_dir: str, python: str = sys.executable
) -> SyncRegistration | None:
    """The service, its role and hooks when a target is configured; ValueError with a sentence for bad settings."""
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
    return SyncRegistration(service, role, USER_SCOPE)
