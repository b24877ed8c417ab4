"""What both reapers read from the hub: every server with its user and name, and whether the state is there."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["servers_of", "state_problem"]


def servers_of(users: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The server models of the hub's user models, each with its ``user`` and ``name``."""
    return [
        {**(model or {}), "user": str(user.get("name", "")), "name": name}
        for user in users
        for name, model in (user.get("servers") or {}).items()
    ]


def state_problem(users: Sequence[Mapping[str, Any]]) -> str | None:
    """A sentence when the user models lack the servers or their state (the token's scopes), else None."""
    for user in users:
        servers = user.get("servers")
        if not isinstance(servers, Mapping):
            return "The hub lists users without their servers: the token needs read:servers."
        if any(not isinstance(s, Mapping) or "state" not in s for s in servers.values()):
            return "The hub lists servers without their state: the token needs admin:server_state."
    return None
