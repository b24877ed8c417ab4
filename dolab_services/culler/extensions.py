"""Stop times users extended to: the limit on an extension, and the store that keeps them.

The stop time the culler enforces is the one the spawner validated and keeps in the server's state
(:class:`~dolab_core.serverstate.ServerState`), which only the hub writes; JupyterHub 6.1 also refuses
``PATCH /users/:u/servers/:s`` while a server is running ("is active. Please stop it before modifying it"). So an
extended stop time cannot go into the running server: the culler keeps it in its own file (which survives the
hub's restarts of the service), bound to that run of the server (its ``started`` time); a later start uses the
user's options again."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Collection, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from dolab_core.times import format_time, parse_time

from ..stop import describe

__all__ = ["ExtensionStore", "extend_offer", "extended_stop_at", "headroom_hours"]


class ExtensionStore:
    """The stop times users extended to, per server run, kept in a JSON file (or in memory without one).

    An entry holds for the run of the server that started at ``started`` (the hub's timestamp), so a later start
    of the same server does not inherit it. The file is replaced atomically on every change.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, log: logging.Logger | None = None) -> None:
        self.path = Path(path) if path else None
        self.log = log or logging.getLogger("dolab.culler")
        self._entries: dict[str, dict[str, str]] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self._entries = {
                    str(k): {"started": str(v["started"]), "stop_at": str(v["stop_at"])}
                    for k, v in data.items()
                    if isinstance(v, Mapping) and "started" in v and "stop_at" in v
                }
            except (OSError, ValueError, AttributeError) as e:
                self.log.error("Cannot read the extended stop times in %s (%s): starting without them", self.path, e)

    def get(self, user: str, server: str, started: str) -> datetime | None:
        """The extended stop time of this run of the server, if the user extended it."""
        entry = self._entries.get(describe(user, server))
        return parse_time(entry["stop_at"]) if entry and entry["started"] == started else None

    def set(self, user: str, server: str, started: str, stop_at: datetime) -> None:
        """Record an extension of this run of the server."""
        self._entries[describe(user, server)] = {"started": started, "stop_at": format_time(stop_at)}
        self._save()

    def prune(self, running: Collection[tuple[str, str, str]]) -> None:
        """Forget extensions of server runs not among ``running`` ``(user, server, started)``."""
        keep = {describe(u, s): started for u, s, started in running}
        gone = [k for k, v in self._entries.items() if keep.get(k) != v["started"]]
        for key in gone:
            del self._entries[key]
        if gone:
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps(self._entries, indent=1, sort_keys=True), encoding="utf-8")
            temporary.replace(self.path)
        except OSError as e:
            self.log.error("Cannot save the extended stop times to %s (%s)", self.path, e)


def extended_stop_at(current: datetime | None, hours: Any, now: datetime, max_run_hours: float) -> datetime:
    """``current`` moved ``hours`` later, within ``max_run_hours`` from ``now`` (0: no limit).

    Raises ValueError with a sentence the user reads.
    """
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not math.isfinite(hours) or hours <= 0:
        raise ValueError(f"hours must be a positive number of hours, not {hours!r}.")
    if current is None:
        raise ValueError("This server has no stop time to extend: it runs until it is idle.")
    try:
        new = max(current, now) + timedelta(hours=hours)
    except OverflowError:
        raise ValueError(f"{hours:g} hours is too far ahead.") from None
    if max_run_hours > 0 and new > now + timedelta(hours=max_run_hours):
        latest = now + timedelta(hours=max_run_hours)
        headroom = max(0.0, (latest - max(current, now)).total_seconds() / 3600)
        raise ValueError(
            f"You can extend to at most {max_run_hours:g} hours from now ({format_time(latest)}); "
            f"that is {math.floor(headroom * 100) / 100:g} more hours at most, not {hours:g}."
        )
    return new


def headroom_hours(stop_at: datetime | None, now: datetime, max_run_hours: float) -> float | None:
    """How many hours ``stop_at`` can still move later within ``max_run_hours`` from ``now`` (0: no limit, so
    infinite); None when there is no stop time to move."""
    if stop_at is None:
        return None
    if max_run_hours <= 0:
        return math.inf
    latest = now + timedelta(hours=max_run_hours)
    return max(0.0, (latest - max(stop_at, now)).total_seconds() / 3600)


def extend_offer(headroom: float | None, extend_hours: float) -> float:
    """What a one-click "Extend" offers: ``extend_hours``, or what is left of ``headroom`` rounded down to a quarter
    hour; 0 when nothing can be offered (no stop time, or the latest stop time allowed)."""
    if headroom is None or headroom <= 0:
        return 0.0
    left = headroom if math.isinf(headroom) else math.floor(headroom * 4) / 4
    return max(0.0, min(extend_hours, left))
