"""``dolab-sync`` as a program (:class:`SyncService`): the hub-managed backup service
(``python -m dolab_services.sync``).

Every ``--interval`` minutes (default 15) it backs up the workspace of every running server whose folder is on this
machine (:meth:`.backups.Backups.sweep`), and remote servers' through their REST API when that is on
(:mod:`.remote_hooks`); it serves the JSON API of :mod:`.web` (list restore points, back up now, restore a path).
The target and policy come from the ``DOLAB_SYNC_*`` variables the hub passes it (:mod:`.config`); storage
credentials live only in the hub's config and this process. Its scopes: :mod:`.registration`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from traitlets import Float, Integer, List, Unicode, default

from ..app import ServiceApp
from ..hubclient import HubClient
from ..servertokens import ServerTokens, revoke_quietly
from .backups import Backups
from .choices import TargetChoices, choices_path
from .config import SyncSettings
from .engine import BackupReport
from .registration import DEFAULT_TRUSTED_SERVICES, SERVICE_NAME
from .remote_hooks import backup_remote_server, sweep_remote
from .tokens import HubAuthStates

__all__ = ["SyncService", "main"]


class SyncService(ServiceApp):
    """Periodic backups of running servers, and the backup API."""

    name = SERVICE_NAME
    description = "Back up users' workspaces to S3; list restore points and restore files."

    interval_minutes = Float(
        config=True,
        help="Minutes between backups of each running server (0: none). Default: $DOLAB_SYNC_INTERVAL_MINUTES or 15.",
    )
    concurrency = Integer(2, config=True, help="At most this many workspaces are backed up or restored at once.")
    timeout_minutes = Float(60, config=True, help="How long one backup or restore may take (minutes).")
    workspace_root = Unicode(
        config=True,
        help="The folder holding every user's workspace (DoLabSpawner.workspace_root); default $DOLAB_WORKSPACE_ROOT.",
    )
    cache_dir = Unicode(config=True, help="Where the hash caches live (default: <data dir>/sync-service-cache).")
    trusted_services = List(
        Unicode(),
        list(DEFAULT_TRUSTED_SERVICES),
        config=True,
        help="Hub services that may back up any user's workspace through the API (the culler, before a stop).",
    )

    aliases = {
        "interval": "SyncService.interval_minutes",
        "concurrency": "SyncService.concurrency",
        "workspace-root": "SyncService.workspace_root",
        "cache-dir": "SyncService.cache_dir",
        "log-level": "Application.log_level",
    }

    @default("workspace_root")
    def _default_workspace_root(self) -> str:
        return os.environ.get("DOLAB_WORKSPACE_ROOT", "")

    @default("cache_dir")
    def _default_cache_dir(self) -> str:
        from dolab_core.paths import default_data_dir

        return str(Path(default_data_dir()) / "sync-service-cache")

    def start(self) -> None:
        """Check the settings, then back up and serve until stopped."""
        try:
            settings = SyncSettings.from_env(os.environ)
            if not settings.enabled:
                raise ValueError("no backup target: set DOLAB_SYNC_S3_BUCKET or DOLAB_SYNC_DRIVE_KEY_FILE")
            if not self.workspace_root:
                raise ValueError("no workspace root: set DOLAB_WORKSPACE_ROOT or --workspace-root")
            hub = HubClient()
        except ValueError as e:
            self.fail(str(e))
        interval = self.interval_minutes if "interval_minutes" in self._trait_values else settings.interval_minutes
        self.share_log("dolab")
        backups = Backups(
            settings,
            Path(self.workspace_root),
            Path(self.cache_dir),
            concurrency=self.concurrency,
            timeout_seconds=self.timeout_minutes * 60,
            log=self.log,
            choices=TargetChoices(settings, choices_path()),
            auth_states=HubAuthStates(hub) if settings.needs_user_tokens else None,
        )
        where = settings.describe(settings.target)
        if len(settings.allowed_targets) > 1:
            where += f" by default (users may choose {', '.join(settings.allowed_targets)})"
        self.log.info(
            "Backing up to %s every %g min (keep %d, deletions %s)",
            where,
            interval,
            settings.keep_snapshots,
            settings.deletions,
        )
        self.run_until_stopped(lambda: self._run(backups, hub, interval))

    async def _run(self, backups: Backups, hub: HubClient, interval_minutes: float) -> int:
        from .web import make_app  # the API needs jupyterhub's OAuth helpers

        server = None
        # Each remote backup may take the whole timeout: tokens outlive it.
        lifetime = int(max(3600, backups.timeout_seconds + 900))
        tokens = ServerTokens(hub, f"{SERVICE_NAME}: backs up this server's workspace", lifetime_seconds=lifetime)
        try:
            trusted = frozenset(self.trusted_services)

            async def remote_backup(user: str, server: str) -> BackupReport | None:
                return await backup_remote_server(backups, hub, tokens, user, server)

            remote = remote_backup if backups.settings.remote_servers else None
            server = self.serve_page(
                lambda prefix: make_app(backups, prefix, log=self.log, trusted_services=trusted, remote_backup=remote),
                SERVICE_NAME,
                serves="API",
                goes_on="periodic backups",
                port_variable="DOLAB_SYNC_PORT",
            )

            async def backup_round() -> None:
                outcomes = await backups.sweep(hub)
                if backups.settings.remote_servers:
                    outcomes.update(await sweep_remote(backups, hub, tokens))
                if outcomes:
                    self.log.info("Periodic backup: %s", "; ".join(f"{u}: {o}" for u, o in outcomes.items()))

            if interval_minutes > 0:
                await self.repeat(backup_round, interval_minutes * 60, "backup round", min_wait_seconds=1)
            await asyncio.Event().wait()  # no periodic backups: serve the API until stopped
            return 0
        finally:
            if server is not None:
                server.stop()
            backups.close()
            await revoke_quietly(tokens)
            hub.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the service (the hub starts it as a managed service)."""
    SyncService.launch_instance(list(argv) if argv is not None else None)
