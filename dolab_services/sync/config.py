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
- ``DOLAB_SYNC_KEEP`` (10): restore points kept per user; ``DOLAB_SYNC_DELETIONS``: ``mirror`` (default) or
  ``keep``; ``DOLAB_SYNC_EXCLUDE``: comma-separated globs; ``DOLAB_SYNC_MAX_FILE_MB`` (0: no cap);
  ``DOLAB_SYNC_INTERVAL_MINUTES`` (15): periodic backups of running servers.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from escapism import escape

from .engine import SyncPolicy
from .s3 import S3Store
from .store import ObjectStore
from .workspace import DEFAULT_EXCLUDES, Excludes

__all__ = ["SECRET_ENV", "SyncSettings", "user_prefix"]

_SAFE = set(string.ascii_lowercase + string.digits)
#: Variables that hold secrets: passed on to the sync service's process only.
SECRET_ENV = ("DOLAB_SYNC_S3_ACCESS_KEY_ID", "DOLAB_SYNC_S3_SECRET_ACCESS_KEY")


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
    interval_minutes: float = 15
    workers: int = 8
    target: str = "s3"
    drive_key_file: str = ""
    drive_folder: str = "DO-LAB backups"
    drive_folder_id: str = ""
    drive_api_url: str = ""

    @property
    def enabled(self) -> bool:
        """Whether a target is configured."""
        return bool(self.bucket) if self.target == "s3" else bool(self.drive_key_file)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SyncSettings:
        """Read the ``DOLAB_SYNC_*`` variables; ValueError with a sentence for a bad value."""

        def number(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{name} must be a number, not {raw!r}") from None
            if value < 0:
                raise ValueError(f"{name} must not be negative")
            return value

        deletions = env.get("DOLAB_SYNC_DELETIONS", "mirror").strip() or "mirror"
        if deletions not in ("mirror", "keep"):
            raise ValueError(f"DOLAB_SYNC_DELETIONS must be mirror or keep, not {deletions!r}")
        bucket = env.get("DOLAB_SYNC_S3_BUCKET", "").strip()
        drive_key = env.get("DOLAB_SYNC_DRIVE_KEY_FILE", "").strip()
        target = env.get("DOLAB_SYNC_TARGET", "").strip() or ("drive" if drive_key and not bucket else "s3")
        if target not in ("s3", "drive"):
            raise ValueError(f"DOLAB_SYNC_TARGET must be s3 or drive, not {target!r}")
        if target == "drive" and not drive_key:
            raise ValueError("DOLAB_SYNC_TARGET=drive needs DOLAB_SYNC_DRIVE_KEY_FILE (a service account's JSON key)")
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
            interval_minutes=number("DOLAB_SYNC_INTERVAL_MINUTES", 15),
            target=target,
            drive_key_file=drive_key,
            drive_folder=env.get("DOLAB_SYNC_DRIVE_FOLDER", "").strip() or "DO-LAB backups",
            drive_folder_id=env.get("DOLAB_SYNC_DRIVE_FOLDER_ID", "").strip(),
            drive_api_url=env.get("DOLAB_SYNC_DRIVE_API_URL", "").strip(),
        )

    def policy(self) -> SyncPolicy:
        """The engine's policy."""
        return SyncPolicy(
            keep_snapshots=self.keep_snapshots,
            deletions="keep" if self.deletions == "keep" else "mirror",
            excludes=Excludes(DEFAULT_EXCLUDES, self.exclude_globs, int(self.max_file_mb * (1 << 20))),
            workers=self.workers,
        )

    def store_for(self, username: str) -> ObjectStore:
        """The store holding ``username``'s backups (and nobody else's)."""
        if not self.enabled:
            raise ValueError("no backup target is configured (DOLAB_SYNC_S3_BUCKET or DOLAB_SYNC_DRIVE_KEY_FILE)")
        if self.target == "drive":
            from .drive import DriveSettings, DriveStore, ServiceAccountKey  # pydrive2 only when Drive is used

            settings = DriveSettings(
                folder_name=self.drive_folder,
                folder_id=self.drive_folder_id or None,
                api_root_url=self.drive_api_url or None,
            )
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
