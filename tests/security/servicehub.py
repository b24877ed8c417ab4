"""A real hub with every DO-LAB service a user can call: the culler, the monitor and dolab-sync (on moto_server's
S3), started by the shipped config, with local single-user servers. Shared by the scope and fuzz attack tests.

Requests go to each service's own address (``http://127.0.0.1:<port>/services/<name>/``), as the proxy would
forward them, with a hub token in ``Authorization``; the services ask the hub who it is, as in production.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests

from ..e2e.hub import Hub, free_port
from ..patience import patience
from ..sync.conftest import S3Server

CULLER, MONITOR, SYNC = "dolab-culler", "dolab-monitor", "dolab-sync"
#: DO-LAB's own scopes, as an admin's token or a role may hold them.
STOP, EXTEND, READ_USAGE, BACKUPS = (
    "custom:dolab:stop-servers",
    "custom:dolab:extend-servers",
    "custom:dolab:read-usage",
    "custom:dolab:manage-backups",
)


def access(service: str) -> str:
    """The scope that opens a service's page and API."""
    return f"access:services!service={service}"


def start_hub(root: Path, s3: S3Server, overlay: str = "", env: dict[str, str] | None = None) -> Hub:
    """The hub with the three services (sync on a new bucket of ``s3``), running; the caller shuts it down."""
    ports = {"DOLAB_SYNC_PORT": str(free_port()), "DOLAB_CULLER_PORT": str(free_port())}
    settings = {
        **s3.sync_env(),
        "DOLAB_SYNC_INTERVAL_MINUTES": "0",  # backups only when asked: the tests count them
        **ports,
        **(env or {}),
    }
    return Hub(root, overlay=overlay, env=settings).start(timeout=120)


def service_url(hub: Hub, service: str) -> str:
    """The service's own address and prefix, from the hub's environment."""
    port = {
        CULLER: "DOLAB_CULLER_PORT",
        MONITOR: "DOLAB_MONITOR_PORT",
        SYNC: "DOLAB_SYNC_PORT",
    }[service]
    return f"http://127.0.0.1:{hub.env[port]}/services/{service}/"


def token(hub: Hub, user: str, scopes: list[str] | None = None) -> str:
    """A new API token of ``user``: with ``scopes`` only, or (None) all the user's permissions."""
    body: dict[str, Any] = {"note": "security test", "expires_in": 3600}
    if scopes is not None:
        body["scopes"] = scopes
    reply = hub.api("POST", f"/users/{user}/tokens", json=body)
    assert reply.status_code == 201, reply.text
    return str(reply.json()["token"])


def call(hub: Hub, service: str, method: str, path: str, token: str, **kwargs: Any) -> requests.Response:
    """A request to a service's API with ``token``."""
    kwargs.setdefault("timeout", 120)
    headers = {"Authorization": f"token {token}", **kwargs.pop("headers", {})}
    return requests.request(method, service_url(hub, service) + path, headers=headers, **kwargs)


def wait_services(hub: Hub, timeout: float = 60) -> None:
    """Wait until each service answers on its address (the hub starts them after its own API is up)."""
    timeout = patience(timeout)
    deadline = time.monotonic() + timeout
    for service in (CULLER, MONITOR, SYNC):
        while True:
            try:
                requests.get(service_url(hub, service) + "api/nothing", timeout=5)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{service} did not answer in {timeout:g} s:\n{hub.log_tail()}") from None
                time.sleep(0.2)
