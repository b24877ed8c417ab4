"""The sync's hooks in the hub's spawner: a final backup before a server is destroyed, a restore at spawn.

In ``jupyterhub_config.py`` (the shipped config does this when ``DOLAB_SYNC_S3_BUCKET`` is set)::

    c.DoLabSpawner.pre_destroy_hooks = ["dolab_services.sync.hooks:final_sync"]
    c.DoLabSpawner.pre_start_hooks = ["dolab_services.sync.hooks:restore_new_workspace"]

:func:`final_sync` runs in ``DoLabSpawner.stop()`` before the backend destroys the server. It backs up the
workspace when it is a folder on the hub's machine (local backend, docker backend with a bind-mounted workspace on
the local engine). A docker workspace in a named volume outlives its container, so it is left alone. A remote
server (a RunPod pod) is backed up through its own REST API with its own token (:mod:`.remote_hooks`); on success
the backend then terminates the pod. A failed backup raises, so the spawner stops the server but keeps its storage
(a pod is stopped with its disk); the user and admin are told through the log and the server's state. Any other
backend raises the same way. The target comes from the hub's ``DOLAB_SYNC_*`` environment (:mod:`.config`).

:func:`pre_stop_final_sync` is the pre-stop hook of the services that stop servers (the culler, the monitor's quota
stops; :mod:`dolab_services.stop`): it asks the dolab-sync service for the backup, so a failure keeps the server
running (the service tries again later) instead of stopping it.

:func:`restore_new_workspace` runs in ``DoLabSpawner.start()`` before the backend starts: a workspace folder that
does not exist yet, or is empty, is filled from the user's latest backup, with progress events on the spawn page.
For a remote server it registers the restore with the backend, which runs it once the new pod's server answers.

Blocking work (boto3, file I/O) runs on a small thread pool of its own, never on the hub's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .choices import TargetChoices, choices_path
from .config import SyncSettings, user_prefix
from .engine import SyncEngine
from .remote_hooks import arm_remote_restore, is_remote, remote_final_sync
from .store import ObjectNotFound, StoreError
from .tokens import user_drive_token

if TYPE_CHECKING:
    from .drive_auth import UserToken

__all__ = ["final_sync", "host_workspace", "pre_stop_final_sync", "restore_new_workspace"]

# The culler's process logs what is under "dolab_services"; the spawner's hooks log through the hub's log.
log = logging.getLogger("dolab_services.sync.hooks")

_pool = ThreadPoolExecutor(2, thread_name_prefix="dolab-sync-hook")
#: How long a final sync may take before the stop gives up on it (and keeps the server's storage).
FINAL_SYNC_TIMEOUT_SECONDS = 1800.0


def host_workspace(spawner: Any) -> Path | None:
    """The workspace folder of the spawner's server when it is on this machine, else None."""
    path = getattr(spawner, "host_workspace", None)
    value = path() if callable(path) else ""
    return Path(value) if value else None


def _settings() -> SyncSettings:
    return SyncSettings.from_env(os.environ)


def _cache_path(username: str, target: str = "s3") -> Path:
    from dolab_core.paths import default_data_dir

    suffix = "" if target == "s3" else f".{target}"
    return Path(default_data_dir()) / "sync-cache" / f"{user_prefix(username)}{suffix}.json.gz"


async def _target(spawner: Any, settings: SyncSettings) -> tuple[str, UserToken | None]:
    """The user's chosen target, and their own Drive token when that target needs it (read from the hub's
    user object, renewed by the hub; :class:`.tokens.NoDriveToken` when they have none)."""
    target = TargetChoices(settings, choices_path()).target_of(spawner.user.name)
    if not settings.uses_user_token(target):
        return target, None

    async def read(_name: str) -> Any:
        return await spawner.user.get_auth_state()

    return target, await user_drive_token(settings, spawner.user.name, read)


async def final_sync(spawner: Any, reason: str) -> None:
    """Back up the server's workspace before it is destroyed; raise (a sentence) when that is not possible."""
    settings = _settings()
    if not settings.enabled:
        return
    user = spawner.user.name
    workspace = host_workspace(spawner)
    backend = getattr(spawner, "backend_name", "")
    if workspace is None:
        if is_remote(spawner):
            target, token = await _target(spawner, settings)
            await remote_final_sync(
                spawner,
                lambda: settings.store_for(user, target, token=token),
                settings.policy(),
                _cache_path(user).parent,
                reason,
                FINAL_SYNC_TIMEOUT_SECONDS,
                max_read_bytes=settings.max_remote_bytes,
            )
            return
        if backend == "docker":
            spawner.log.info("No final sync for %s: a Docker volume outlives its container", user)
            return
        raise StoreError(
            f"DO-LAB cannot back up the workspace of a {backend or 'remote'} server yet, so it was stopped and its"
            " storage kept. Ask an administrator before deleting it."
        )
    if not workspace.is_dir():
        return

    target, token = await _target(spawner, settings)

    def run() -> Any:
        store = settings.store_for(user, target, token=token)
        try:
            return SyncEngine(store, settings.policy()).backup(workspace, cache_path=_cache_path(user, target))
        finally:
            store.close()

    spawner.log.info("Final sync of %s's workspace before stopping (%s)", user, reason)
    report = await asyncio.wait_for(asyncio.wrap_future(_pool.submit(run)), FINAL_SYNC_TIMEOUT_SECONDS)
    spawner.log.info(
        "Final sync of %s done: snapshot %s, %d files uploaded",
        user,
        report.snapshot or f"unchanged ({report.previous})",
        report.uploaded_files,
    )


async def pre_stop_final_sync(user: str, server: str, reason: str) -> None:
    """The pre-stop hook of the services that stop servers: ask dolab-sync to back ``user``'s workspace up first.

    Runs in the stopping service's process (the culler's or the monitor's, which hold no storage credentials):
    ``POST api/backup`` on ``$DOLAB_SYNC_SERVICE_URL`` with that service's own token. A failed backup raises, so
    the service keeps the server running and tries again later (the culler at its next sweep). A remote server (a
    RunPod pod) is read by the service through its own REST API; a workspace the service cannot see at all (a
    Docker volume on another engine) is left to the spawner's own final sync.
    """
    url = os.environ.get("DOLAB_SYNC_SERVICE_URL", "").rstrip("/")
    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not url or not token:
        raise StoreError("The culler does not know where the backup service is (DOLAB_SYNC_SERVICE_URL).")
    request = HTTPRequest(
        f"{url}/api/backup",
        method="POST",
        body=json.dumps({"user": user, "server": server}),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        connect_timeout=10,
        request_timeout=FINAL_SYNC_TIMEOUT_SECONDS,
    )
    try:
        reply = await AsyncHTTPClient().fetch(request)
    except HTTPClientError as e:
        message = _message(e.response.body if e.response is not None else b"") or str(e)
        if e.code == 409:
            log.info("No backup of %s before the %s stop: %s", user, reason, message)
            return
        raise StoreError(f"The backup before stopping {user}/{server} failed: {message}") from None
    except OSError as e:
        raise StoreError(f"The backup service did not answer ({e.strerror or e}); the server keeps running.") from None
    answer = json.loads(reply.body or b"{}")
    log.info("Backed up %s before the %s stop: %s", user, reason, answer.get("snapshot") or "unchanged")


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        return ""


async def restore_new_workspace(spawner: Any) -> None:
    """Fill a new (missing or empty) workspace folder from the user's latest backup, with progress events."""
    settings = _settings()
    workspace = host_workspace(spawner)
    if settings.enabled and workspace is None and is_remote(spawner):
        name = spawner.user.name
        try:
            target, token = await _target(spawner, settings)
        except StoreError as e:
            spawner.log.error("Restoring %s's new workspace failed: %s", name, e)
            return
        arm_remote_restore(
            spawner, lambda: settings.store_for(name, target, token=token), settings.policy(), _cache_path(name).parent
        )
        return
    if not settings.enabled or workspace is None:
        return
    if workspace.exists() and any(workspace.iterdir()):
        return
    user = spawner.user.name
    emit = getattr(spawner, "emit", None)
    loop = asyncio.get_running_loop()
    last = [-1]

    def progress(done: int, total: int) -> None:
        percent = int(100 * done / total) if total else 100
        if emit is not None and percent // 10 != last[0] // 10:
            last[0] = percent
            loop.call_soon_threadsafe(emit, 20 + percent // 10, f"Restoring your workspace from backup: {percent}%")

    def run() -> Any:
        store = settings.store_for(user, target, token=token)
        try:
            engine = SyncEngine(store, settings.policy())
            if not engine.snapshots():
                return None
            workspace.mkdir(parents=True, exist_ok=True, mode=0o700)
            uid = getattr(spawner, "workspace_uid", None)
            if os.geteuid() == 0 and isinstance(uid, int) and uid >= 0:
                os.chown(workspace, uid, -1)  # the container's user owns its workspace (docker backend)
            return engine.restore(workspace, progress=progress)
        finally:
            store.close()

    try:
        target, token = await _target(spawner, settings)
        report = await asyncio.wrap_future(_pool.submit(run))
    except (StoreError, ObjectNotFound) as e:
        spawner.log.error("Restoring %s's new workspace failed: %s", user, e)
        if emit is not None:
            emit(29, f"Your workspace could not be restored from backup ({e}); it starts empty.")
        return
    if report is not None:
        spawner.log.info("Restored %s's new workspace from snapshot %s (%d files)", user, report.snapshot, report.files)
        if emit is not None:
            emit(29, f"Restored {report.files} files from your backup of {report.snapshot}")
