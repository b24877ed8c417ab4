"""What users read about their servers: a stop the culler foresees (:class:`CullWarning`), and a running server
as the page shows it (:class:`ServerView`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dolab_core.times import format_time

__all__ = ["CullWarning", "ServerView", "server_label"]


def server_label(server: str) -> str:
    """A server as a sentence names it."""
    return f"server '{server}'" if server else "default server"


@dataclass(frozen=True)
class CullWarning:
    """A stop the culler foresees for a server: why and when."""

    user: str
    server: str
    reason: str
    stop_at: datetime
    detail: str = ""

    def message(self) -> str:
        """What the user reads."""
        when = format_time(self.stop_at)
        what = f"Your {server_label(self.server)}"
        if self.reason == "deadline":
            return f"{what} stops at {when}, the stop time you chose. Extend it if your work needs longer."
        if self.reason == "idle":
            return f"{what} has been idle and stops at {when} unless you use it or choose to keep it running."
        if self.reason == "max_age":
            return f"{what} stops at {when}: it has run as long as its profile allows. Save your work."
        return f"{what} stops at {when} ({self.reason})."

    def to_json(self) -> dict[str, Any]:
        """The ``api/warnings`` form."""
        return {
            "server": self.server,
            "reason": self.reason,
            "stop_at": format_time(self.stop_at),
            "message": self.message(),
        }


@dataclass(frozen=True)
class ServerView:
    """One of a user's running servers as the page shows it."""

    name: str
    profile: str
    started: datetime
    stop_at: datetime | None
    warning: CullWarning | None
    #: How many hours the stop time can still move (None: no stop time, so nothing to extend).
    headroom_hours: float | None = None

    @property
    def label(self) -> str:
        """The server's name for the page."""
        return f"Server '{self.name}'" if self.name else "Default server"
