"""The sync service's core: every user's backups, one user at a time, off the event loop.

:class:`Backups` runs the blocking engine (boto3, file I/O) on a bounded thread pool, one operation per user at a
time (a turn per user, so a periodic backup, a restore and an API request never interleave), each bounded by a
timeout. The pool is shared fairly: a user's turn lasts until the thread doing the work ends, even when the
request stopped waiting for it at the timeout, so no user ever holds more than one of the pool's threads, and the
pool's queue holds at most one operation per user (the rest wait for their user's turn), so it serves users in
turn. At most :data:`MAX_WAITING_PER_USER` operations of a user wait; more are refused with a sentence
(:class:`TooManyWaiting`). A restore's list of paths is bounded before it waits (:mod:`.selection`).

It only ever builds a store for the user it is asked about (:meth:`SyncSettings.store_for`), so nothing here can
reach another user's prefix; it goes to the target the user chose within the admin's policy
(:mod:`.choices`), and a Drive target in user mode uses that user's own token, read from the hub at each operation
(:mod:`.tokens`), never another's. :meth:`Backups.sweep` backs up every running server whose spawner state
names a workspace folder on this machine (:attr:`ServerState.workspace`, set by DoLabSpawner for the local backend and
for docker servers with a bind-mounted workspace on the local engine).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from dolab_core.serverstate import ServerState

from ..hubclient import HubClient
from .choices import TargetChoices
from .config import SyncSettings, user_prefix
from .engine import BackupReport, RestoreReport, SyncEngine
from .selection import MAX_PATHS, check_path_list
from .store import StoreError
from .tokens import AuthStateReader, NoDriveToken, user_drive_token
from .workspace import UnsafePath, check_relpath

__all__ = ["MAX_WAITING_PER_USER", "Backups", "NoWorkspace", "Overdue", "TooManyWaiting", "Unscheduled"]

T = TypeVar("T")

#: Operations of one user that may wait for their turn behind the running one (the periodic backup, the culler's
#: before a stop, the user's own requests); more are refused, so no one piles requests up in the service.
MAX_WAITING_PER_USER = 4


class NoWorkspace(Exception):
    """The user has no workspace folder on this machine (yet)."""


class Unscheduled(StoreError):
    """An operation the service would not start, or stopped waiting for; ``status`` is the HTTP status to answer."""

    status = 503


class TooManyWaiting(Unscheduled):
    """The user has :data:`MAX_WAITING_PER_USER` operations waiting already."""

    status = 429


class Overdue(Unscheduled):
    """An operation ran past the service's timeout. A thread cannot be stopped: the work goes on, and the user's
    next operation waits until it is done."""

    status = 504


class _Turn:
    """One user's turn at the pool: held from the start of an operation until its thread ends; ``waiting`` counts
    the operations waiting for it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0


class Backups:
    """Back up, list and restore users' workspaces (see the module docstring)."""

    def __init__(
        self,
        settings: SyncSettings,
        workspace_root: Path,
        cache_dir: Path,
        *,
        concurrency: int = 2,
        timeout_seconds: float = 3600,
        log: logging.Logger | None = None,
        choices: TargetChoices | None = None,
        auth_states: AuthStateReader | None = None,
    ) -> None:
        self.settings = settings
        self.choices = choices
        self.auth_states = auth_states
        self.workspace_root = workspace_root
        self.cache_dir = cache_dir
        self.timeout_seconds = timeout_seconds
        self.log = log or logging.getLogger("dolab.sync")
        self.pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="dolab-sync")
        self._turns: dict[str, _Turn] = {}

    def close(self) -> None:
        """Let running operations finish, start no new ones."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def workspace_of(self, user: str) -> Path:
        """The user's workspace folder (as DoLabSpawner names it)."""
        return self.workspace_root / user_prefix(user)

    def target_of(self, user: str) -> str:
        """The target ``user``'s backups go to (their choice within the policy, else the default)."""
        return self.choices.target_of(user) if self.choices is not None else self.settings.target

    def cache_path(self, user: str, target: str) -> Path:
        """The hash cache of ``user``'s backups to ``target`` (one per target: each holds its own blobs)."""
        suffix = "" if target == "s3" else f".{target}"
        return self.cache_dir / f"{user_prefix(user)}{suffix}.json.gz"

    async def _run(self, user: str, work: Callable[[SyncEngine], T], target: str | None = None) -> T:
        """Run ``work`` on the pool in ``user``'s turn (see the module docstring); its result, or its error."""
        turn = self._turns.setdefault(user, _Turn())
        if turn.lock.locked() and turn.waiting >= MAX_WAITING_PER_USER:
            self.log.warning("Refused a backup or restore of %s: %d wait already", user, turn.waiting)
            raise TooManyWaiting(
                f"{MAX_WAITING_PER_USER} backups or restores of {user}'s workspace are waiting already; "
                "try again when they are done."
            )
        turn.waiting += 1
        try:
            await turn.lock.acquire()
        finally:
            turn.waiting -= 1
        try:
            target = target or self.target_of(user)
            token = None
            if self.settings.uses_user_token(target):
                if self.auth_states is None:
                    raise StoreError("The backup service cannot read users' Drive tokens; an admin must check it.")
                token = await user_drive_token(self.settings, user, self.auth_states)  # this user's, read now

            def run() -> T:
                store = self.settings.store_for(user, target, token=token)
                try:
                    return work(SyncEngine(store, self.settings.policy()))
                finally:
                    store.close()

            future = self.pool.submit(run)
        except BaseException:
            turn.lock.release()
            raise
        # The turn ends with the thread, not with this wait: work past its timeout still runs, and the user's next
        # operation must neither run beside it nor take a second thread of the pool.
        loop = asyncio.get_running_loop()
        future.add_done_callback(lambda _: _soon(loop, turn.lock.release))
        waited = asyncio.wrap_future(future)
        try:
            done, _ = await asyncio.wait({waited}, timeout=self.timeout_seconds)
        except asyncio.CancelledError:
            waited.cancel()  # one still queued never starts (and gives the turn back); a running one cannot stop
            raise
        minutes = self.timeout_seconds / 60
        if not done and future.cancel():  # still queued behind other users' work: it never starts
            raise Overdue(
                f"The backup service had no room for the backup or restore of {user}'s workspace in {minutes:g} "
                "minutes; try again later."
            )
        if not done:
            waited.cancel()
            self.log.error("A backup or restore of %s is still running after %g min; its next one waits", user, minutes)
            raise Overdue(
                f"The backup or restore of {user}'s workspace took longer than {minutes:g} minutes. It goes on, and "
                "the next one waits until it is done."
            )
        return waited.result()

    async def backup(self, user: str, workspace: Path | None = None) -> BackupReport:
        """Back up ``workspace`` (default: the user's folder) now."""
        folder = workspace or self.workspace_of(user)
        if not folder.is_dir():
            raise NoWorkspace(f"{user} has no workspace here yet; start a server first.")
        target = self.target_of(user)
        cache = self.cache_path(user, target)
        report = await self._run(user, lambda engine: engine.backup(folder, cache_path=cache), target)
        if report.snapshot:
            self.log.info(
                "Backed up %s: snapshot %s, %d of %d files uploaded (%d bytes) in %.1f s",
                user,
                report.snapshot,
                report.uploaded_files,
                report.files,
                report.uploaded_bytes,
                report.seconds,
            )
        else:
            self.log.debug("Backup of %s: unchanged since %s", user, report.previous)
        return report

    async def snapshots(self, user: str) -> tuple[str, list[dict[str, Any]]]:
        """Where the user's backups are (the store's description), and their restore points, newest first."""
        where, snaps = await self._run(user, lambda engine: (engine.store.description, engine.snapshots()))
        return where, [
            {"id": s.id, "created": s.created.isoformat().replace("+00:00", "Z") if s.created else None}
            for s in reversed(snaps)
        ]

    async def snapshot(self, user: str, snapshot_id: str) -> dict[str, Any]:
        """One restore point's content."""
        manifest = await self._run(user, lambda engine: engine.manifest(snapshot_id))
        return {
            "id": manifest.snapshot,
            "files": [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns} for f in manifest.files],
            "links": [{"path": link.path, "target": link.target} for link in manifest.links],
            "dirs": list(manifest.dirs),
            "total_bytes": manifest.total_bytes,
        }

    async def restore(
        self, user: str, snapshot_id: str | None, paths: Iterable[str] | None, into: str = ""
    ) -> RestoreReport:
        """Restore a snapshot (or some paths of it) into the user's workspace, or into its sub-folder ``into``."""
        root = self.workspace_of(user)
        if not root.is_dir():
            raise NoWorkspace(f"{user} has no workspace here yet; start a server once, then restore.")
        # Bounded here, before the request waits for its turn (PathSelection checks each path in the thread).
        wanted = None
        if paths is not None:
            wanted = check_path_list(paths if isinstance(paths, list) else list(islice(paths, MAX_PATHS + 1)))
        if into:
            check_relpath(into)

        def work(engine: SyncEngine) -> RestoreReport:
            # The engine walks ``into`` from the workspace's root by descriptors: never ``root / into`` by path,
            # which the user could turn through a symlink between a check and the writes.
            return engine.restore(root, snapshot_id=snapshot_id, paths=wanted, into=into)

        report = await self._run(user, work)
        self.log.info(
            "Restored %d files of %s's snapshot %s into %s/%s", report.files, user, report.snapshot, root, into
        )
        return report

    async def sweep(self, hub: HubClient) -> dict[str, str]:
        """Back up every running server's workspace on this machine; user -> outcome (one line each)."""
        workspaces: dict[str, Path] = {}
        async for user in hub.users(state="ready"):
            for server in (user.get("servers") or {}).values():
                folder = ServerState.of(server).workspace
                if server.get("ready") and folder:
                    workspaces.setdefault(user["name"], Path(folder))
        outcomes: dict[str, str] = {}

        async def one(name: str, folder: Path) -> None:
            try:
                report = await self.backup(name, folder)
                outcomes[name] = f"snapshot {report.snapshot}" if report.snapshot else "unchanged"
            except NoDriveToken as e:
                outcomes[name] = "skipped: no Google Drive token"  # theirs to fix by signing in, not an error
                self.log.warning("Periodic backup of %s skipped: %s", name, e)
            except (StoreError, NoWorkspace, UnsafePath, OSError, asyncio.TimeoutError) as e:
                outcomes[name] = f"failed: {e}"
                self.log.error("Periodic backup of %s failed: %s", name, e)

        await asyncio.gather(*(one(n, f) for n, f in workspaces.items()))
        return outcomes


def _soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """Run ``callback`` on ``loop`` from a pool thread; nothing when the loop is closed (the service is stopping)."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass
