"""Helpers of the culler's unit tests: server and user models as the hub lists them, the Lab (a hub double
and single-user server doubles) and a Sweeper on it.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from dolab_services.culler.policy import CullPolicy, Rule
from dolab_services.culler.sweeper import Sweeper
from dolab_services.culler.telemetry import StaticTelemetry
from dolab_services.hubclient import HubClient
from dolab_services.servertokens import ServerTokens
from dolab_services.stop import StopPath

from ..hub_double import HubDouble

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
T0 = "2030-01-01T10:00:00.000000Z"
SLOT = {"index": 0, "uuid": "GPU-aaaa", "name": "NVIDIA A100", "memory_gb": 80.0, "host": "local"}


def iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def ago(seconds: float) -> str:
    return iso(datetime.now(timezone.utc) - timedelta(seconds=seconds))


def server_model(
    server_url: str = "",
    *,
    started: str = T0,
    last_activity: str | None = T0,
    profile: str = "cpu",
    backend: str = "local",
    slots: list[dict] | None = None,
    stop_at: str | None = None,
    state: bool = True,
    ready: bool = True,
    pending: str | None = None,
) -> dict[str, Any]:
    """A server model as the hub lists it with read:servers and admin:server_state."""
    options: dict[str, Any] = {"profile": profile}
    if stop_at:
        options["stop_at"] = stop_at
    model: dict[str, Any] = {
        "started": started,
        "last_activity": last_activity,
        "ready": ready,
        "pending": pending,
        "user_options": options,
    }
    if state:
        model["state"] = {
            "profile": profile,
            "backend": backend,
            "slots": slots or [],
            "server_url": server_url,
            "backend_state": {"pid": 1},
        }
        if stop_at:
            model["state"]["stop_at"] = stop_at
    return model


def user_model(name: str, servers: dict[str, dict], groups: list[str] | None = None) -> dict[str, Any]:
    return {"kind": "user", "name": name, "admin": False, "groups": groups or [], "servers": servers}


def kernels(*states: str) -> list[dict]:
    return [{"id": f"k{i}", "execution_state": s, "connections": 0} for i, s in enumerate(states)]


#: Every server: idle after 60 s, warned 30 s before; the user "exempt" and the group "staff" are exempt.
POLICY = CullPolicy(
    rules=(Rule(idle_seconds=60),),
    warn_before_seconds=30,
    exempt_users=frozenset({"exempt"}),
    exempt_groups=frozenset({"staff"}),
)


class Lab:
    """A hub double listing ``users``, and single-user server doubles answering their kernels."""

    def __init__(self, hub: HubDouble, servers: HubDouble) -> None:
        self.hub, self.servers = hub, servers
        self.users: list[dict] = []
        self.kernels: dict[str, list[dict]] = {}  # user -> api/kernels answer
        self.hang: set[str] = set()
        self.kernel_reads: list[str] = []
        self.minted: list[str] = []
        self.refused_tokens: set[str] = set()
        self.revoked: list[str] = []
        hub.respond = self.hub_answer
        servers.respond = self.server_answer

    def url(self, user: str) -> str:
        return f"{self.servers.url}/user/{user}/"

    def add(self, name: str, groups: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("server_url", self.url(name))
        self.users.append(user_model(name, {"": server_model(**kwargs)}, groups))
        self.kernels.setdefault(name, kernels("idle"))

    def hub_answer(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        if path.endswith("/tokens") and method == "POST":  # a token for one server, owned by its user
            name = path.split("/")[4]
            assert body["scopes"] == [f"access:servers!server={name}/"], body
            self.minted.append(name)
            return 201, {"token": server_token(name, len(self.minted)), "id": f"a{len(self.minted)}"}
        if "/tokens/" in path and method == "DELETE":
            self.revoked.append(path.split("/")[4])
            return 204, None
        if method == "GET" and path == "/hub/api/users":
            return 200, {"items": self.users, "_pagination": {"offset": 0, "limit": 200, "total": len(self.users)}}
        if method == "GET" and path.startswith("/hub/api/users/"):
            name = path.rsplit("/", 1)[1]
            found = [u for u in self.users if u["name"] == name]
            return (200, found[0]) if found else (404, {"status": 404, "message": "Not found"})
        if method == "POST":
            return 200, None
        if method == "DELETE":
            name = path.split("/")[4]
            for user in self.users:
                if user["name"] == name:
                    user["servers"].pop("", None)
            return 204, None
        return 404, {"status": 404, "message": "Not found"}

    def server_answer(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        user = path.split("/")[2]
        sent = next(r for r in reversed(self.servers.requests) if r["path"] == path)["headers"].get("Authorization", "")
        if not sent.startswith(f"token {server_token(user, 0)[:-1]}"):  # only a token minted for this server
            return 403, {"message": "Forbidden"}
        if sent.removeprefix("token ") in self.refused_tokens:  # its owner revoked it on her token page
            return 403, {"message": "Forbidden"}
        self.kernel_reads.append(user)
        if user in self.hang:
            time.sleep(3)
        return 200, self.kernels[user]

    def activity_posts(self) -> list[str]:
        return [r["path"].split("/")[4] for r in self.hub.requests if r["path"].endswith("/activity")]

    def stops(self) -> list[str]:
        return [r["path"].split("/")[4] for r in self.hub.requests if r["path"].endswith("/server")]


def server_token(user: str, number: int) -> str:
    """The token the hub double mints for ``user``'s default server (the ``number``-th minted)."""
    return f"server-token-{user}-{number}"


def sweeper(
    lab: Lab, client: HubClient, telemetry: StaticTelemetry | None = None, policy: CullPolicy = POLICY, **kwargs: Any
) -> Sweeper:
    return Sweeper(
        client,
        policy,
        telemetry or StaticTelemetry(),
        StopPath(client),
        ServerTokens(client, "test"),
        kernel_timeout_seconds=kwargs.pop("kernel_timeout_seconds", 1),
        **kwargs,
    )
