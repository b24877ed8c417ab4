"""The sync's hooks for servers whose workspace is not on the hub's machine (RunPod pods): through their REST API.

:mod:`.hooks` calls these for a spawner whose backend is in :data:`REMOTE_BACKENDS`:

- :func:`remote_final_sync` (from ``final_sync``, in ``DoLabSpawner.stop()`` before the backend destroys the server,
  so also on the culler's stops): backs the server's workspace up through its contents API
  (:mod:`.remote`). Success: the spawner goes on and the backend terminates the pod (``stop_action``). Failure
  raises a sentence: the spawner then *suspends* the pod (stopped, disk kept, billed for storage only), logs it as
  an error for the admin and keeps the sentence in the server's state (``kept``) for the user.
- :func:`arm_remote_restore` (from ``restore_new_workspace``, in ``start()`` before the backend starts): the pod
  does not exist yet, so it registers a restore the backend runs once the pod's server answers
  (``RunPodBackend.server_ready_hooks``). A new, empty workspace is filled from the latest snapshot, with
  progress events; a pod that kept its disk (resumed) is not empty and is left alone.
- :func:`sweep_remote` (from the ``dolab-sync`` service's periodic round) and :func:`backup_remote_server` (the
  culler's backup before a stop, through the service's API): back up a ready remote server at its own address
  (:attr:`~dolab_core.serverstate.ServerState.server_url`, never through the proxy).

Which token: never one that grants more than the pod already has, since whoever is root in the pod records what it
is sent. The hub-side hooks use the server's own API token (``spawner.api_token``), the one the hub minted for this
server and already put into the pod: its ``server`` role holds ``access:servers!server=<user>/<name>``, exactly
this server. The ``dolab-sync`` service asks the hub for a token owned by the pod's user and limited to that same
scope (:class:`~dolab_services.servertokens.ServerTokens`; its role holds ``tokens`` for that), never sending its
own. The store's credentials stay in the hub: the hub reads the files and writes the blobs itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dolab_core.serverstate import ServerState

from ..hubclient import HubAPIError, HubClient
from ..servertokens import ServerTokens
from .config import user_prefix
from .contents import MAX_READ_BYTES, AccessRefused, RemoteServer
from .engine import BackupReport, RestoreReport, SyncEngine, SyncPolicy
from .remote import backup_remote, restore_remote
from .store import ObjectStore, StoreError
from .workspace import UnsafePath

__all__ = [
    "REMOTE_BACKENDS",
    "arm_remote_restore",
    "backup_remote_server",
    "is_remote",
    "remote_cache_path",
    "remote_final_sync",
    "sweep_remote",
]

log = logging.getLogger("dolab_services.sync.hooks")

#: Backends whose servers' workspaces the hub reaches only through the server's REST API.
REMOTE_BACKENDS = frozenset({"runpod"})
#: How long one request to a user's server may take (seconds).
REQUEST_TIMEOUT_SECONDS = 120.0
#: How long a restore waits for a new pod's server to answer before giving up (seconds).
READY_TIMEOUT_SECONDS = 300.0
#: How long a restore at spawn may take in all (seconds); the pod's start timeout bounds it too.
RESTORE_TIMEOUT_SECONDS = 1800.0

_pool = ThreadPoolExecutor(4, thread_name_prefix="dolab-sync-remote")

StoreFactory = Callable[[], ObjectStore]


def is_remote(spawner: Any) -> bool:
    """Whether the spawner's server keeps its workspace where only its REST API reaches it."""
    return getattr(spawner, "backend_name", "") in REMOTE_BACKENDS


def remote_cache_path(cache_dir: Path, username: str, store: ObjectStore) -> Path:
    """The hash cache of a user's remote workspace for one store (a cache entry means "this content is in that
    store": another target needs its own)."""
    where = hashlib.sha256(store.description.encode()).hexdigest()[:12]
    return cache_dir / f"{user_prefix(username)}.remote-{where}.json.gz"


def _run_backup(make_store: StoreFactory, policy: SyncPolicy, server: RemoteServer, user: str, cache_dir: Path) -> Any:
    store = make_store()
    try:
        return backup_remote(SyncEngine(store, policy), server, cache_path=remote_cache_path(cache_dir, user, store))
    finally:
        store.close()
        server.close()


async def remote_final_sync(
    spawner: Any,
    make_store: StoreFactory,
    policy: SyncPolicy,
    cache_dir: Path,
    reason: str,
    timeout_seconds: float,
    *,
    max_read_bytes: int = MAX_READ_BYTES,
) -> BackupReport:
    """Back up a remote server's workspace before it is destroyed (reading at most ``max_read_bytes`` from it);
    raise a sentence when that failed."""
    user = spawner.user.name
    server = getattr(spawner, "server", None)
    url = server.url if server is not None and server.port else ""
    token = getattr(spawner, "api_token", "") or ""
    if not url or not token:
        raise StoreError(
            "The hub does not know your server's address, so your workspace could not be backed up before the stop; "
            "the pod was stopped with its disk kept. Start the server again, or ask an administrator."
        )
    remote = RemoteServer(url, token, timeout_seconds=REQUEST_TIMEOUT_SECONDS, max_read_bytes=max_read_bytes)
    spawner.log.info("Final sync of %s's remote workspace before stopping (%s)", user, reason)
    try:
        report: BackupReport = await asyncio.wait_for(
            asyncio.wrap_future(_pool.submit(_run_backup, make_store, policy, remote, user, cache_dir)),
            timeout_seconds,
        )
    except asyncio.TimeoutError:
        why = f"it took more than {timeout_seconds:g} s"
    except (StoreError, UnsafePath, OSError, ValueError) as e:
        why = str(e) or type(e).__name__
    else:
        spawner.log.info(
            "Final sync of %s done: snapshot %s, %d files downloaded, %d uploaded",
            user,
            report.snapshot or f"unchanged ({report.previous})",
            report.hashed_files,
            report.uploaded_files,
        )
        return report
    raise StoreError(
        f"The backup of your workspace before the stop failed ({why.rstrip('.')}), so your pod was stopped with its "
        "disk kept (billed for storage only) instead of deleted. Start the server again to get back to your files, "
        "or ask an administrator."
    )


def arm_remote_restore(
    spawner: Any, make_store: StoreFactory, policy: SyncPolicy, cache_dir: Path
) -> Callable[[str, str], Awaitable[RestoreReport | None]] | None:
    """Register the restore of a new pod's empty workspace with the spawner's backend; the registered hook, or
    None when the backend cannot run one."""
    hooks = getattr(spawner, "server_ready_hooks", None)
    if not isinstance(hooks, list):
        spawner.log.warning("Backend %s cannot restore a workspace at start", getattr(spawner, "backend_name", "?"))
        return None
    user = spawner.user.name
    emit = getattr(spawner, "emit", None)

    async def restore(url: str, token: str) -> RestoreReport | None:
        loop = asyncio.get_running_loop()
        last = [-1]

        def progress(done: int, total: int) -> None:
            percent = int(100 * done / total) if total else 100
            if emit is not None and percent // 10 != last[0] // 10:
                last[0] = percent
                loop.call_soon_threadsafe(emit, 81 + percent // 15, f"Restoring your workspace from backup: {percent}%")

        def run() -> RestoreReport | None:
            remote = RemoteServer(url, token, timeout_seconds=REQUEST_TIMEOUT_SECONDS)
            store = make_store()
            try:
                engine = SyncEngine(store, policy)
                if not engine.snapshots():
                    return None
                remote.wait_ready(READY_TIMEOUT_SECONDS)
                if not remote.is_empty(policy.excludes):
                    spawner.log.info("%s's pod has files already (its disk was kept): no restore", user)
                    return None
                if emit is not None:
                    loop.call_soon_threadsafe(emit, 81, "Restoring your workspace from backup")
                cache = remote_cache_path(cache_dir, user, store)
                return restore_remote(engine, remote, cache_path=cache, progress=progress)
            finally:
                store.close()
                remote.close()

        try:
            report = await asyncio.wait_for(asyncio.wrap_future(_pool.submit(run)), RESTORE_TIMEOUT_SECONDS)
        except (StoreError, UnsafePath, OSError, ValueError, asyncio.TimeoutError) as e:
            why = str(e) or "it took too long"
            spawner.log.error("Restoring %s's new remote workspace failed: %s", user, why)
            if emit is not None:
                emit(
                    89,
                    f"Your workspace could not be restored from backup ({why.rstrip('.')}); your backups are kept, "
                    "restore them from the backup page.",
                )
            return None
        if report is not None:
            spawner.log.info("Restored %s's new pod from snapshot %s (%d files)", user, report.snapshot, report.files)
            if emit is not None:
                emit(89, f"Restored {report.files} files from your backup of {report.snapshot}")
        return report

    hooks.append(restore)
    return restore


def _remote_urls(user: Mapping[str, Any], server_name: str | None = None) -> dict[str, str]:
    """Server name -> address of the user's ready remote servers (``server_name``: only that one)."""
    urls = {}
    for name, server in (user.get("servers") or {}).items():
        state = ServerState.of(server)
        url = state.server_url
        if (
            (server_name is None or name == server_name)
            and server.get("ready")
            and not state.workspace
            and state.backend in REMOTE_BACKENDS
            and url.startswith(("http://", "https://"))
        ):
            urls[str(name)] = url
    return urls


async def _backup_at(backups: Any, tokens: ServerTokens, name: str, server: str, url: str) -> BackupReport:
    """Back up ``name``'s remote server ``server`` at ``url`` under the service's per-user lock, pool and timeout,
    with a token for that server alone (minted again once if the server refuses it: its owner may revoke it)."""

    async def backup_with(token: str) -> BackupReport:
        def work(engine: SyncEngine) -> BackupReport:
            remote = RemoteServer(
                url, token, timeout_seconds=REQUEST_TIMEOUT_SECONDS, max_read_bytes=backups.settings.max_remote_bytes
            )
            try:
                cache = remote_cache_path(backups.cache_dir, name, engine.store)
                return backup_remote(engine, remote, cache_path=cache)
            finally:
                remote.close()

        report: BackupReport = await backups._run(name, work)
        return report

    try:
        return await tokens.use(
            name,
            server,
            backup_with,
            lambda e: isinstance(e, AccessRefused),
            valid_for_seconds=backups.timeout_seconds + 60,
        )
    except HubAPIError as e:
        raise StoreError(f"The hub gave no token to read the server ({e})") from None


async def sweep_remote(backups: Any, hub: HubClient, tokens: ServerTokens) -> dict[str, str]:
    """The service's periodic round for remote servers: back up each ready one at its own address; user ->
    outcome. ``backups`` is the service's :class:`.backups.Backups` (its per-user lock, pool and timeout)."""
    servers: dict[str, tuple[str, str]] = {}
    async for user in hub.users(state="ready"):
        for server, url in _remote_urls(user).items():
            servers.setdefault(user["name"], (server, url))
    await tokens.prune({(name, server) for name, (server, _) in servers.items()})
    outcomes: dict[str, str] = {}

    async def one(name: str, server: str, url: str) -> None:
        try:
            report = await _backup_at(backups, tokens, name, server, url)
            outcomes[name] = f"snapshot {report.snapshot} (remote)" if report.snapshot else "unchanged (remote)"
        except (StoreError, UnsafePath, OSError, ValueError, asyncio.TimeoutError) as e:
            outcomes[name] = f"failed: {e}"
            backups.log.error("Periodic backup of %s's remote server failed: %s", name, e)

    await asyncio.gather(*(one(n, s, u) for n, (s, u) in servers.items()))
    return outcomes


async def backup_remote_server(
    backups: Any, hub: HubClient, tokens: ServerTokens, user: str, server: str
) -> BackupReport | None:
    """Back up one user's running remote server now (the culler's backup before a stop, ``POST api/backup`` with
    ``server``); None when that server is not a ready remote one. Errors propagate as the engine raises them."""
    model = await hub.request("GET", f"/users/{quote(user, safe='')}")
    urls = _remote_urls(model or {}, server)
    if not urls:
        return None
    return await _backup_at(backups, tokens, user, server, urls[server])
