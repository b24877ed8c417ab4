"""Attack: a user who controls her own server records what the services send it, and tries to use it elsewhere.

Mallory's server is hers: she writes a ``jupyter_server_config.py`` into her HOME (her workspace) from a kernel, as
anyone can, and restarts her server. The config wraps the kernel list handler so every ``Authorization`` header
that reaches it lands in a file. The real culler of a real hub reads her kernels when her server nears its idle
timeout. With what she captured she then tries what a service token would allow: stop Bob's server, read Bob's
files, list every user. Each must be refused: the header may only grant access to her own server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ..e2e.hub import Hub, free_port
from ..e2e.jupyter import run_in_kernel
from ..patience import patience

pytestmark = pytest.mark.e2e

MALLORY, BOB = "mallory", "bob"
CAPTURED = "captured-headers.txt"

#: Written by Mallory into ~/.jupyter/jupyter_server_config.py: keep every Authorization header of api/kernels.
RECORDER = f"""
import os
from jupyter_server.services.kernels.handlers import MainKernelHandler

_get = MainKernelHandler.get


async def get(self, *args, **kwargs):
    with open(os.path.join(os.path.expanduser("~"), {CAPTURED!r}), "a") as f:
        f.write(self.request.headers.get("Authorization", "") + "\\n")
    return await _get(self, *args, **kwargs)


MainKernelHandler.get = get
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("service-tokens")
    policy = root / "policy.json"
    # Idle after 30 s, so the culler reads Mallory's kernels soon; Bob is never culled.
    policy.write_text(json.dumps({"rules": [{"idle_hours": 30 / 3600}], "exempt_users": [BOB]}))
    env = {
        "DOLAB_CULLER_INTERVAL": "2",
        "DOLAB_CULLER_POLICY": str(policy),
        "DOLAB_CULLER_PORT": str(free_port()),
    }
    hub = Hub(root, env=env).start()
    try:
        yield hub
    finally:
        hub.shutdown()


def captured_headers(hub: Hub) -> list[str]:
    path = Path(hub.data_dir) / "workspaces" / MALLORY / CAPTURED
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def test_what_the_culler_sends_a_server_grants_nothing_beyond_it(hub: Hub) -> None:
    for user in (MALLORY, BOB):
        hub.create_user(user)
        assert hub.start_server(user, {"profile": "cpu"}).status_code in (201, 202)
        hub.wait_ready(user, timeout=180)
    mallory_token = hub.user_token(MALLORY)

    # Mallory plants her recorder the way any user could, from a kernel, and restarts her server.
    code = (
        "import os; d = os.path.expanduser('~/.jupyter'); os.makedirs(d, exist_ok=True); "
        f"open(os.path.join(d, 'jupyter_server_config.py'), 'w').write({RECORDER!r}); print('planted')"
    )
    assert "planted" in run_in_kernel(hub.url, MALLORY, mallory_token, code)
    hub.stop_server(MALLORY)
    assert hub.start_server(MALLORY, {"profile": "cpu"}).status_code in (201, 202)
    hub.wait_ready(MALLORY, timeout=180)

    # The culler reads her kernels once her server nears its idle stop (30 s); her config records the header.
    deadline = time.monotonic() + patience(120)
    while not captured_headers(hub) and time.monotonic() < deadline:
        time.sleep(0.5)
    headers = captured_headers(hub)
    assert headers, f"the culler never read Mallory's kernels:\n{hub.log_tail(40)}"
    token = headers[0].removeprefix("token ").strip()
    as_mallory = {"Authorization": f"token {token}"}

    # With it she cannot stop Bob's server, read Bob's files, or list the hub's users.
    stop = requests.delete(f"{hub.url}/hub/api/users/{BOB}/server", headers=as_mallory, timeout=30)
    assert stop.status_code in (403, 404), stop.status_code
    files = requests.get(f"{hub.url}/user/{BOB}/api/contents", headers=as_mallory, timeout=30, allow_redirects=False)
    assert files.status_code in (302, 403), files.status_code  # a redirect to log in, never Bob's listing
    assert requests.get(f"{hub.url}/hub/api/users", headers=as_mallory, timeout=30).status_code == 403
    assert hub.user(BOB)["servers"][""]["ready"], "Bob's server must still be running"

    # What she holds is hers, and only reaches her own server.
    who = requests.get(f"{hub.url}/hub/api/user", headers=as_mallory, timeout=30)
    assert who.status_code == 200, who.text
    assert who.json()["name"] == MALLORY
    # Besides her own server, only what the hub adds to every token: reading her own name and groups.
    scopes = set(who.json()["scopes"])
    assert f"access:servers!server={MALLORY}/" in scopes
    assert all(s == f"access:servers!server={MALLORY}/" or s.endswith(f"!user={MALLORY}") for s in scopes), scopes
    assert not any(s.startswith(("admin", "delete", "tokens", "servers", "list")) for s in scopes), scopes
