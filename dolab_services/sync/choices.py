"""Which backup target each user chose, within the admin's policy (``DOLAB_SYNC_TARGETS``).

Admins set the default target (``DOLAB_SYNC_TARGET``) and the ones users may pick (``DOLAB_SYNC_TARGETS``). A
user's choice is kept in ``<data dir>/sync-targets.json`` (``{"user": "drive", ...}``), which the sync service
writes and the hub's hooks read, so it survives restarts of both. A choice the policy no longer allows falls back
to the default. Switching targets does not move old backups: they stay where they were made, and listing and
restoring read the chosen target only (switch back to reach them).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

from .config import SyncSettings

__all__ = ["CHOICES_FILE", "SWITCH_NOTE", "TargetChoices", "choices_path"]

CHOICES_FILE = "sync-targets.json"
SWITCH_NOTE = (
    "Switching targets does not move old backups: they stay where they were made. Listing and restoring read the "
    "chosen target only; switch back to reach the old ones."
)


def choices_path(data_dir: str | Path | None = None) -> Path:
    """Where the choices live: ``<data dir>/sync-targets.json`` (default: DO-LAB's data directory)."""
    if data_dir is None:
        from dolab_core.paths import default_data_dir

        data_dir = default_data_dir()
    return Path(data_dir) / CHOICES_FILE


class TargetChoices:
    """Users' chosen targets in one small JSON file (read at every use, written atomically)."""

    def __init__(self, settings: SyncSettings, path: Path) -> None:
        self.settings = settings
        self.path = path
        self._lock = threading.Lock()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # unreadable: everyone gets the default until the next choice rewrites it
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def chosen(self, user: str) -> str | None:
        """What ``user`` chose, if it is still allowed."""
        choice = self._read().get(user)
        return choice if choice in self.settings.allowed_targets else None

    def target_of(self, user: str) -> str:
        """The target ``user``'s backups go to: their choice, else the admin's default."""
        return self.chosen(user) or self.settings.target

    def choose(self, user: str, target: str) -> str:
        """Record ``user``'s choice; ValueError (a sentence) for a target outside the admin's policy."""
        allowed = self.settings.allowed_targets
        if target not in allowed:
            raise ValueError(
                f"Backups on this hub may go to {' or '.join(allowed)}; {target!r} is not allowed by the "
                "administrator's policy."
            )
        with self._lock:
            data = self._read()
            if target == self.settings.target:
                data.pop(user, None)  # the default: follows the admin's default if it changes
            else:
                data[user] = target
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".sync-targets-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return target
