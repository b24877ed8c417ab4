"""The sync service's JSON API, under its prefix (``/services/dolab-sync/``), behind the hub's OAuth.

- ``GET  {prefix}api/backups``: ``{"user", "target" (where), "target_name" (s3, drive), "snapshots": [{"id",
  "created"}, ...]}``, newest first, from the target the user chose;
- ``GET  {prefix}api/backups/<id>``: one restore point: ``{"id", "files": [{"path", "size", "mtime_ns"}], "links",
  "dirs", "total_bytes"}``;
- ``POST {prefix}api/backup``: back up the workspace now; ``{"snapshot", "previous", "files", "uploaded_files",
  "uploaded_bytes"}`` (``snapshot`` null: nothing had changed). With ``"server": name`` a user without a folder on
  the hub's machine is backed up from that running remote server (a RunPod pod) through its REST API;
- ``POST {prefix}api/restore``: ``{"snapshot": id (default: the latest), "paths": [...] (default: everything; at
  most 1,000 paths of 4,096 characters each, :mod:`.selection`), "into": "sub/folder" (default: the workspace
  itself)}``; answers ``{"snapshot", "files", "bytes"}``;
- ``GET  {prefix}api/target``: ``{"user", "target", "default", "allowed", "where", "note"}``, the target the user's
  backups go to and the admin's policy; ``PUT {prefix}api/target`` with ``{"target": "drive"}`` chooses another
  one of ``allowed`` (400 with a sentence otherwise). Old backups stay where they were made (``note``).

A user's backups and restores run one at a time, and at most 4 more wait (429 beyond them, 504 for one past the
service's timeout, which goes on): :mod:`.backups`.

Every request is about the current user's own backups. A token with ``custom:dolab:manage-backups`` for a user
may add ``user`` (a query argument, or in the body), and so may the hub services named in ``trusted_services`` for
``api/backup`` only (the culler, before a stop); anyone else naming another user gets a 403. The token's scopes
decide, never the hub's admin flag (:mod:`dolab_services.scopes`). A script sends ``Authorization: token <the
user's API token>``; users need ``access:services!service=dolab-sync`` (the shipped config grants it to every user).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from tornado import web

from ..scopes import MANAGE_BACKUPS
from ..web import JsonApiMixin, ServiceHandler, access_logger
from .backups import Backups, NoWorkspace, Unscheduled
from .choices import SWITCH_NOTE
from .engine import BackupReport
from .selection import MAX_PATH_CHARS, PathListRefused, check_path_list, describe_paths
from .store import ObjectNotFound, StoreError
from .tokens import NoDriveToken
from .workspace import UnsafePath

__all__ = ["RemoteBackup", "make_app"]

#: ``(user, server) -> report``: back up a user's remote server now, None when it is not a ready remote one.
RemoteBackup = Callable[[str, str], Awaitable["BackupReport | None"]]


class _ApiHandler(JsonApiMixin, ServiceHandler):
    """The sync service's JSON API; the user comes from the hub."""

    def initialize(
        self,
        backups: Backups,
        hub_auth: HubOAuth,
        log: logging.Logger,
        trusted_services: frozenset[str],
        remote_backup: RemoteBackup | None = None,
    ) -> None:
        self.backups = backups
        self.remote_backup = remote_backup
        self.hub_auth = hub_auth
        self.log = log
        self.trusted_services = trusted_services

    def owner(self, named: Any = None, trusted_ok: bool = False) -> str:
        """The user whose backups are meant: the current one, or the one named (with ``custom:dolab:manage-backups``
        for them, or from a trusted service where ``trusted_ok``)."""
        me = str(self.current_user["name"])
        user = named if named not in (None, "") else self.get_query_argument("user", me)
        if not isinstance(user, str) or len(user) > 255:
            raise web.HTTPError(400, "user must be a user name.")
        if user != me and not ((trusted_ok and self.trusted_caller) or self.has_scope(MANAGE_BACKUPS, user)):
            raise web.HTTPError(403, "You can only see and restore your own backups.")
        return user

    @property
    def trusted_caller(self) -> bool:
        """A hub service allowed to act for any user (the culler, which backs a server up before stopping it)."""
        return self.current_user.get("kind") == "service" and self.current_user.get("name") in self.trusted_services

    def failed(self, error: Exception) -> web.HTTPError:
        """The answer for an engine failure: a sentence, the details in the log."""
        if isinstance(error, ObjectNotFound):
            return web.HTTPError(404, str(error))
        if isinstance(error, NoWorkspace | NoDriveToken):
            return web.HTTPError(409, str(error))
        if isinstance(error, (UnsafePath, ValueError)):
            return web.HTTPError(400, str(error))
        if isinstance(error, Unscheduled):  # too many waiting (429), or past the timeout (504): a sentence
            return web.HTTPError(error.status, str(error))
        if isinstance(error, StoreError):
            self.log.error("Backup store failure for %s: %s", self.current_user["name"], error, exc_info=error)
            return web.HTTPError(502, str(error))
        self.log.error("Backup operation failed", exc_info=error)
        return web.HTTPError(500, "The backup service failed; an administrator can read why in its log.")


class BackupsHandler(_ApiHandler):
    """The user's restore points."""

    @web.authenticated
    async def get(self) -> None:
        user = self.owner()
        try:
            target, snaps = await self.backups.snapshots(user)
        except Exception as e:
            raise self.failed(e) from None
        self.reply({"user": user, "target": target, "target_name": self.backups.target_of(user), "snapshots": snaps})


class TargetHandler(_ApiHandler):
    """Where the user's backups go, and their choice within the admin's policy."""

    def describe(self, user: str) -> dict[str, Any]:
        settings = self.backups.settings
        target = self.backups.target_of(user)
        return {
            "user": user,
            "target": target,
            "default": settings.target,
            "allowed": list(settings.allowed_targets),
            "where": settings.describe(target),
            "note": SWITCH_NOTE,
        }

    @web.authenticated
    async def get(self) -> None:
        self.reply(self.describe(self.owner()))

    @web.authenticated
    async def put(self) -> None:
        data = self.body()
        user = self.owner(data.get("user"))
        target = data.get("target")
        if not isinstance(target, str) or not target:
            raise web.HTTPError(400, "target must be the name of a backup target, e.g. s3 or drive.")
        if self.backups.choices is None:
            raise web.HTTPError(409, "This backup service does not keep users' choices of target.")
        try:
            self.backups.choices.choose(user, target)
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        self.log.info("%s set the backup target of %s to %s", self.current_user["name"], user, target)
        self.reply(self.describe(user))


class SnapshotHandler(_ApiHandler):
    """One restore point's files."""

    @web.authenticated
    async def get(self, snapshot_id: str) -> None:
        user = self.owner()
        if len(snapshot_id) > 64:  # ids are timestamps; a longer one names nothing (and is too long a store key)
            raise web.HTTPError(404, "There is no such restore point.")
        try:
            self.reply({"user": user, **await self.backups.snapshot(user, snapshot_id)})
        except Exception as e:
            raise self.failed(e) from None


class BackupNowHandler(_ApiHandler):
    """Back up the user's workspace now (``server``: the server meant, so a remote one is read through its API)."""

    async def _remote(self, user: str, server: str) -> BackupReport | None:
        assert self.remote_backup is not None
        try:
            return await self.remote_backup(user, server)
        except Exception as e:
            raise self.failed(e) from None

    @web.authenticated
    async def post(self) -> None:
        data = self.body()
        user = self.owner(data.get("user"), trusted_ok=True)
        server = data.get("server")
        if server is not None and not isinstance(server, str):
            raise web.HTTPError(400, "server must be a server name ('' for the default server).")
        try:
            report = await self.backups.backup(user)
        except NoWorkspace as e:
            # No folder here: the server may be remote (a RunPod pod), read through its own REST API.
            remote = await self._remote(user, server) if server is not None and self.remote_backup else None
            if remote is None:
                raise self.failed(e) from None
            report = remote
        except Exception as e:
            raise self.failed(e) from None
        self.reply(
            {
                "user": user,
                "snapshot": report.snapshot,
                "previous": report.previous,
                "files": report.files,
                "uploaded_files": report.uploaded_files,
                "uploaded_bytes": report.uploaded_bytes,
            }
        )


class RestoreHandler(_ApiHandler):
    """Restore a snapshot, or some paths of it, into the user's workspace."""

    @web.authenticated
    async def post(self) -> None:
        data = self.body()
        user = self.owner(data.get("user"))
        snapshot = data.get("snapshot") or None
        paths = data.get("paths")
        into = data.get("into") or ""
        if snapshot is not None and (not isinstance(snapshot, str) or len(snapshot) > 64):
            raise web.HTTPError(400, "snapshot must be a restore point's id.")
        if paths is not None:
            try:
                paths = check_path_list(paths)  # at most MAX_PATHS of MAX_PATH_CHARS each, before any work
            except PathListRefused as e:
                raise web.HTTPError(400, str(e)) from None
        if not isinstance(into, str) or len(into) > MAX_PATH_CHARS:
            raise web.HTTPError(
                400, f"into must be a folder relative to your workspace, of at most {MAX_PATH_CHARS} characters."
            )
        chosen = "all" if paths is None else describe_paths(paths)  # a few paths and a count, never the whole list
        self.log.info("%s restores %s of %s's snapshot %s", self.current_user["name"], chosen, user, snapshot)
        try:
            report = await self.backups.restore(user, snapshot, paths, into)
        except Exception as e:
            raise self.failed(e) from None
        self.reply({"user": user, "snapshot": report.snapshot, "files": report.files, "bytes": report.bytes})


def make_app(
    backups: Backups,
    prefix: str,
    *,
    hub_auth: HubOAuth | None = None,
    log: logging.Logger,
    trusted_services: frozenset[str] = frozenset(),
    remote_backup: RemoteBackup | None = None,
) -> web.Application:
    """The tornado application under ``prefix``; OAuth settings from the environment the hub gives the service."""
    prefix = "/" + prefix.strip("/") + "/"
    hub_auth = hub_auth or HubOAuth.instance(cache_max_age=60)
    args = {
        "backups": backups,
        "hub_auth": hub_auth,
        "log": log,
        "trusted_services": trusted_services,
        "remote_backup": remote_backup,
    }
    return web.Application(
        [
            (prefix + "oauth_callback", HubOAuthCallbackHandler),
            (prefix + "api/backups", BackupsHandler, args),
            (prefix + r"api/backups/([A-Za-z0-9]+)", SnapshotHandler, args),
            (prefix + "api/backup", BackupNowHandler, args),
            (prefix + "api/restore", RestoreHandler, args),
            (prefix + "api/target", TargetHandler, args),
        ],
        cookie_secret=secrets.token_bytes(32),
        log_function=access_logger(log),
    )
