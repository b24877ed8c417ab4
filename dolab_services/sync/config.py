"""Where backups go and how they are kept, read from the environment of the hub and the sync service.

Variables (all optional unless a target is wanted; README.md, "Workspace backup"):

- ``DOLAB_SYNC_S3_BUCKET``: the bucket; setting it switches backups on (S3 target).
- ``DOLAB_SYNC_S3_ENDPOINT``: an S3-compatible endpoint URL (MinIO, Ceph, R2...); empty: AWS.
- ``DOLAB_SYNC_S3_REGION``, ``DOLAB_SYNC_S3_PREFIX`` (default ``dolab-backups``): each user's backups live under
  ``<prefix>/<escaped user name>/``.
- ``DOLAB_SYNC_S3_ACCESS_KEY_ID``, ``DOLAB_SYNC_S3_SECRET_ACCESS_KEY``: the credentials (else boto3's own chain
  in the service's environment). They are passed to the sync service only, never to a user's server.
- ``DOLAB_SYNC_TARGET``: ``s3`` or ``drive`` (default: ``s3`` when a bucket is set, else ``drive`` when a Drive
  key is). Google Drive through a service account: ``DOLAB_SYNC_DRIVE_KEY_FILE`` (its JSON key; setting it
  switches backups on), ``DOLAB_SYNC_DRIVE_FOLDER`` (default ``DO-LAB backups``) or ``DOLAB_SYNC_DRIVE_FOLDER_ID``,
  and ``DOLAB_SYNC_DRIVE_API_URL`` (a Drive-compatible endpoint; empty: Google's). One folder per user.
- ``DOLAB_SYNC_DRIVE_AUTH``: ``service-account`` (default) or ``user``: each user's backups go to their own Drive
  with the token the DO-LAB Google login keeps in their encrypted auth_state (``DOLAB_DRIVE_BACKUP``). The service
  reads it from the hub (scope ``admin:auth_state``) at each backup and restore; the hub keeps it fresh. With
  ``DOLAB_SYNC_DRIVE_CLIENT_ID`` / ``DOLAB_SYNC_DRIVE_CLIENT_SECRET`` (the login's OAuth client) and
  ``DOLAB_SYNC_DRIVE_TOKEN_URI`` the service may also renew an expired token itself when the hub has not.
- ``DOLAB_SYNC_TARGETS``: the targets users may choose from (comma-separated, e.g. ``s3,drive``); default: only
  ``DOLAB_SYNC_TARGET``, which stays the default for users who chose nothing.
- ``DOLAB_SYNC_KEEP`` (10): restore points kept per user; ``DOLAB_SYNC_DELETIONS``: ``mirror`` (default) or
  ``keep``; ``DOLAB_SYNC_EXCLUDE``: comma-separated globs; ``DOLAB_SYNC_MAX_FILE_MB`` (0: no cap);
  ``DOLAB_SYNC_INTERVAL_MINUTES`` (15): periodic backups of running servers; ``DOLAB_SYNC_MAX_REMOTE_GB`` (200): the
  most one backup of a remote server may read from it (the server is its user's and may lie about sizes).
- ``DOLAB_SYNC_REMOTE_SERVERS`` (``1``/``0``; default: on when the hub has ``RUNPOD_API_KEY``): the service also
  backs up remote servers (RunPod pods) through their REST API, and its role gets ``tokens`` for that (to mint a
  token per server, owned by its user, for that server alone).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from escapism import escape

from .engine import SyncPolicy
from .s3 import S3Store
from .store import ObjectStore
from .workspace import DEFAULT_EXCLUDES, Excludes

if TYPE_CHECKING:
    from .drive_auth import UserToken

__all__ = ["SECRET_ENV", "TARGETS", "SyncSettings", "user_prefix"]

_SAFE = set(string.ascii_lowercase + string.digits)
#: Variables that hold secrets: passed on to the sync service's process only.
SECRET_ENV = ("DOLAB_SYNC_S3_ACCESS_KEY_ID", "DOLAB_SYNC_S3_SECRET_ACCESS_KEY", "DOLAB_SYNC_DRIVE_CLIENT_SECRET")
#: Every backup target there is.
TARGETS = ("s3", "drive")
#: Google's OAuth token endpoint (a user token's default).
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"


def user_prefix(username: str) -> str:
    """A user's folder in the store: only ``[a-z0-9-]`` (as their workspace folder), so no name reaches another's."""
    return escape(username, safe=_SAFE, escape_char="-")


@dataclass(frozen=True)
class SyncSettings:
    """The backup target and policy. ``bucket`` empty: backups are off."""

    bucket: str = ""
    endpoint_url: str = ""
    region: str = ""
    prefix: str = "dolab-backups"
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    keep_snapshots: int = 10
    deletions: str = "mirror"
    exclude_globs: tuple[str, ...] = ()
    max_file_mb: float = 0
    max_remote_gb: float = 200
    interval_minutes: float = 15
    workers: int = 8
    target: str = "s3"
    drive_key_file: str = ""
    drive_folder: str = "DO-LAB backups"
    drive_folder_id: str = ""
    drive_api_url: str = ""
    drive_auth: str = "service-account"
    drive_client_id: str = ""
    drive_client_secret: str = field(default="", repr=False)
    drive_token_uri: str = GOOGLE_TOKEN_URI
    targets: tuple[str, ...] = ()
    remote_servers: bool = False

    @property
    def enabled(self) -> bool:
        """Whether the default target is configured."""
        return self.configured(self.target)

    def configured(self, target: str) -> bool:
        """Whether ``target`` has what it needs (a bucket; a Drive key or the users' own tokens)."""
        if target == "s3":
            return bool(self.bucket)
        if target == "drive":
            return bool(self.drive_key_file) or self.drive_auth == "user"
        return False

    @property
    def allowed_targets(self) -> tuple[str, ...]:
        """The targets users may choose from (the admin's policy); the default target is always one."""
        return self.targets or (self.target,)

    def uses_user_token(self, target: str) -> bool:
        """Whether backups to ``target`` go through each user's own Google token."""
        return target == "drive" and self.drive_auth == "user"

    @property
    def needs_user_tokens(self) -> bool:
        """Whether the service must read users' tokens from the hub (scope ``admin:auth_state``)."""
        return any(self.uses_user_token(t) for t in self.allowed_targets)

    def describe(self, target: str) -> str:
        """Where ``target``'s backups live, for logs and pages (no secrets)."""
        if target == "s3":
            return f"s3://{self.bucket}/{self.prefix}"
        root = self.drive_folder_id or self.drive_folder
        if self.drive_auth == "user":
            return f"each user's own Google Drive, folder {root}"
        return f"Google Drive folder {root}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SyncSettings:
        """Read the ``DOLAB_SYNC_*`` variables; ValueError with a sentence for a bad value."""

        def number(name: str, default: float) -> float:
            return _env_number(env, name, default)

        deletions = env.get("DOLAB_SYNC_DELETIONS", "mirror").strip() or "mirror"
        if deletions not in ("mirror", "keep"):
            raise ValueError(f"DOLAB_SYNC_DELETIONS must be mirror or keep, not {deletions!r}")
        bucket = env.get("DOLAB_SYNC_S3_BUCKET", "").strip()
        drive_key = env.get("DOLAB_SYNC_DRIVE_KEY_FILE", "").strip()
        drive_auth = _env_drive_auth(env, drive_key)
        target, targets = _env_targets(env, bucket, drive_ready=bool(drive_key) or drive_auth == "user")
        keep = int(number("DOLAB_SYNC_KEEP", 10))
        if keep < 1:
            raise ValueError("DOLAB_SYNC_KEEP must be at least 1")
        return cls(
            bucket=bucket,
            endpoint_url=env.get("DOLAB_SYNC_S3_ENDPOINT", "").strip(),
            region=env.get("DOLAB_SYNC_S3_REGION", "").strip(),
            prefix=env.get("DOLAB_SYNC_S3_PREFIX", "dolab-backups").strip().strip("/"),
            access_key_id=env.get("DOLAB_SYNC_S3_ACCESS_KEY_ID", ""),
            secret_access_key=env.get("DOLAB_SYNC_S3_SECRET_ACCESS_KEY", ""),
            keep_snapshots=keep,
            deletions=deletions,
            exclude_globs=tuple(g.strip() for g in env.get("DOLAB_SYNC_EXCLUDE", "").split(",") if g.strip()),
            max_file_mb=number("DOLAB_SYNC_MAX_FILE_MB", 0),
            max_remote_gb=number("DOLAB_SYNC_MAX_REMOTE_GB", 200),
            interval_minutes=number("DOLAB_SYNC_INTERVAL_MINUTES", 15),
            target=target,
            drive_key_file=drive_key,
            drive_folder=env.get("DOLAB_SYNC_DRIVE_FOLDER", "").strip() or "DO-LAB backups",
            drive_folder_id=env.get("DOLAB_SYNC_DRIVE_FOLDER_ID", "").strip(),
            drive_api_url=env.get("DOLAB_SYNC_DRIVE_API_URL", "").strip(),
            drive_auth=drive_auth,
            drive_client_id=env.get("DOLAB_SYNC_DRIVE_CLIENT_ID", "").strip(),
            drive_client_secret=env.get("DOLAB_SYNC_DRIVE_CLIENT_SECRET", "").strip(),
            drive_token_uri=env.get("DOLAB_SYNC_DRIVE_TOKEN_URI", "").strip() or GOOGLE_TOKEN_URI,
            targets=targets,
            remote_servers=env.get("DOLAB_SYNC_REMOTE_SERVERS", "").strip().lower() in ("1", "true", "yes")
            or (not env.get("DOLAB_SYNC_REMOTE_SERVERS", "").strip() and bool(env.get("RUNPOD_API_KEY", "").strip())),
        )

    @property
    def max_remote_bytes(self) -> int:
        """The most one backup of a remote server may read from it."""
        return int(self.max_remote_gb * (1 << 30))

    def policy(self) -> SyncPolicy:
        """The engine's policy."""
        return SyncPolicy(
            keep_snapshots=self.keep_snapshots,
            deletions="keep" if self.deletions == "keep" else "mirror",
            excludes=Excludes(DEFAULT_EXCLUDES, self.exclude_globs, int(self.max_file_mb * (1 << 20))),
            workers=self.workers,
        )

    def store_for(self, username: str, target: str | None = None, token: UserToken | None = None) -> ObjectStore:
        """The store holding ``username``'s backups (and nobody else's) on ``target`` (default: the admin's).

        A Drive target in user mode needs ``token``, the user's own (:func:`.tokens.drive_token`); without one it
        raises :class:`.tokens.NoDriveToken` with the sentence the user reads.
        """
        target = target or self.target
        if not self.configured(target):
            raise ValueError(f"the backup target {target} is not configured on this hub")
        if target == "drive":
            from .drive import DriveSettings, DriveStore  # pydrive2 only when Drive is used
            from .drive_auth import ServiceAccountKey

            settings = DriveSettings(
                folder_name=self.drive_folder,
                folder_id=self.drive_folder_id or None,
                api_root_url=self.drive_api_url or None,
            )
            if self.uses_user_token(target):
                if token is None:
                    from .tokens import NoDriveToken

                    raise NoDriveToken(username)
                return DriveStore(user_prefix(username), token, settings)
            return DriveStore(user_prefix(username), ServiceAccountKey(Path(self.drive_key_file)), settings)
        root = f"{self.prefix}/{user_prefix(username)}" if self.prefix else user_prefix(username)
        return S3Store(
            self.bucket,
            root,
            endpoint_url=self.endpoint_url or None,
            region_name=self.region or None,
            access_key_id=self.access_key_id or None,
            secret_access_key=self.secret_access_key or None,
            max_connections=max(10, 2 * self.workers),
        )


def _env_number(env: Mapping[str, str], name: str, default: float) -> float:
    """A non-negative number variable; ValueError with a sentence otherwise."""
    raw = env.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    return value


def _env_drive_auth(env: Mapping[str, str], drive_key: str) -> str:
    """``DOLAB_SYNC_DRIVE_AUTH``: ``service-account`` (the default) or ``user``, which takes no key file."""
    drive_auth = env.get("DOLAB_SYNC_DRIVE_AUTH", "").strip().lower() or "service-account"
    if drive_auth not in ("service-account", "user"):
        raise ValueError(f"DOLAB_SYNC_DRIVE_AUTH must be service-account or user, not {drive_auth!r}")
    if drive_auth == "user" and drive_key:
        raise ValueError(
            "DOLAB_SYNC_DRIVE_AUTH=user uses each user's own Google token: unset DOLAB_SYNC_DRIVE_KEY_FILE, or set "
            "DOLAB_SYNC_DRIVE_AUTH=service-account to use the service account"
        )
    return drive_auth


def _env_targets(env: Mapping[str, str], bucket: str, drive_ready: bool) -> tuple[str, tuple[str, ...]]:
    """The default target (``DOLAB_SYNC_TARGET``) and the ones users may choose (``DOLAB_SYNC_TARGETS``)."""
    target = env.get("DOLAB_SYNC_TARGET", "").strip() or ("drive" if drive_ready and not bucket else "s3")
    if target not in TARGETS:
        raise ValueError(f"DOLAB_SYNC_TARGET must be s3 or drive, not {target!r}")
    if target == "drive" and not drive_ready:
        raise ValueError(
            "DOLAB_SYNC_TARGET=drive needs DOLAB_SYNC_DRIVE_KEY_FILE (a service account's JSON key) or "
            "DOLAB_SYNC_DRIVE_AUTH=user (each user's own Google token)"
        )
    listed = (t.strip().lower() for t in env.get("DOLAB_SYNC_TARGETS", "").split(","))
    targets = tuple(dict.fromkeys(t for t in listed if t))
    for allowed in targets:
        if allowed not in TARGETS:
            raise ValueError(f"DOLAB_SYNC_TARGETS may list s3 and drive, not {allowed!r}")
        if allowed == "s3" and not bucket:
            raise ValueError("DOLAB_SYNC_TARGETS lists s3, which needs DOLAB_SYNC_S3_BUCKET")
        if allowed == "drive" and not drive_ready:
            raise ValueError(
                "DOLAB_SYNC_TARGETS lists drive, which needs DOLAB_SYNC_DRIVE_KEY_FILE or DOLAB_SYNC_DRIVE_AUTH=user"
            )
    if targets and target not in targets:
        raise ValueError(f"DOLAB_SYNC_TARGETS must include the default target DOLAB_SYNC_TARGET={target}")
    return target, targets
