"""Times as the services read and write them: the hub's and users' ISO 8601 timestamps, always aware, in UTC."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

__all__ = ["format_time", "hub_time", "parse_time", "utcnow"]


def parse_time(value: Any) -> datetime | None:
    """A hub or user_options timestamp (ISO 8601, ``Z`` or an offset; naive means UTC) as an aware datetime."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def format_time(when: datetime) -> str:
    """A stop time as users and ``user_options`` write it: UTC, whole seconds, with a ``Z``."""
    return when.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def hub_time(when: datetime) -> str:
    """A timestamp as the hub's API writes it (UTC, microseconds, ``Z``)."""
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(timezone.utc)


def server_label(server: str) -> str:
    """A server as a sentence names it."""
    return f"server '{server}'" if server else "default server"
