"""A real JupyterHub for end-to-end tests: the shipped jupyterhub_config.py, a test overlay, real proxy.

The hub runs as a subprocess on loopback ports of its own, with its data directory in a temporary folder. Tests
drive it through its REST API with a service token that the overlay registers.

Every ``timeout`` here is what a quiet 4-core machine needs; the waits stretch it with :func:`tests.patience.patience`,
and so do the hub's own spawn limits (``start_timeout``, ``http_timeout``) in the test overlay.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from tests.patience import patience

REPO = Path(__file__).resolve().parents[2]
PAGINATION = {"Accept": "application/jupyterhub-pagination+json"}

TEST_OVERLAY = """
# Written by tests/e2e/hub.py: a service the tests drive the hub with.
c.JupyterHub.services.append({{"name": "dolab-test", "api_token": {token!r}}})
c.JupyterHub.load_roles.append(
    {{
        "name": "dolab-test",
        "scopes": ["admin:users", "admin:servers", "tokens", "access:servers", "list:users"],
        "services": ["dolab-test"],
    }}
)
c.JupyterHub.log_level = "DEBUG"
# JupyterHub's 60 s to start a server and 30 s for it to answer, stretched to this machine (a profile's own still win).
c.Spawner.start_timeout = {start_timeout}
c.Spawner.http_timeout = {http_timeout}
# Local servers of a root hub run as accounts with this prefix: one no real account has, new per hub.
c.LocalProcessBackend.system_user_prefix = {account_prefix!r}
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hub:
    """One hub subprocess with its own data directory, ports and overlay."""

    def __init__(self, root: Path, overlay: str = "", env: dict[str, str] | None = None):
        self.root = root
        self.data_dir = root / "data"
        self.overlay_dir = root / "overlay"
        self.overlay_dir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(16)
        self.account_prefix = f"dlt{secrets.token_hex(2)}-"
        (self.overlay_dir / "00-test-service.py").write_text(
            TEST_OVERLAY.format(
                token=self.token,
                account_prefix=self.account_prefix,
                start_timeout=round(patience(60)),
                http_timeout=round(patience(30)),
            )
        )
        if os.geteuid() == 0:
            let_accounts_through(root, REPO, Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable))
        if overlay:
            (self.overlay_dir / "10-test.py").write_text(overlay)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "DOLAB_"))}
        self.env.update(
            DOLAB_DATA_DIR=str(self.data_dir),
            DOLAB_BIND_URL=self.url,
            DOLAB_HUB_PORT=str(free_port()),
            DOLAB_PROXY_API_PORT=str(free_port()),
            DOLAB_CULLER_PORT=str(free_port()),
            DOLAB_MONITOR_PORT=str(free_port()),
            DOLAB_CONFIG_DIR=str(self.overlay_dir),
            PYTHONUNBUFFERED="1",
        )
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "hub.log"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {self.token}"

    # ----- process -------------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> Hub:
        """Start the hub and wait until its API answers (``timeout`` stretched by :func:`patience`)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the hub process keeps writing to it
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(REPO / "jupyterhub_config.py")],
            cwd=self.root,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        timeout = patience(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the hub exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/hub/api", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the hub did not answer in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """Stop the hub the way an admin would (SIGTERM); servers keep running (cleanup_servers=False)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(patience(timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> Hub:
        """Stop and start the hub; running servers are expected to survive."""
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 60) -> str:
        """The end of the hub's log, for assertion messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def shutdown(self) -> None:
        """End of the test: stop every server through the API (all at once: each stop may wait on a backup or an
        engine), stop the hub, kill any survivor."""
        pids: list[int] = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                servers = [(u["name"], name, s) for u in self.users() for name, s in (u.get("servers") or {}).items()]
                for *_, server in servers:
                    if pid := (server.get("state") or {}).get("backend_state", {}).get("pid"):
                        pids.append(pid)
                # A DELETE returns once its stop is done (up to the hub's slow_stop_timeout): send them side by side.
                with ThreadPoolExecutor(max_workers=8) as pool:
                    for user, name, _ in servers:
                        pool.submit(self.unshared_api, "DELETE", server_path(user, name))
                deadline = time.monotonic() + patience(60)
                while any(user.get("servers") for user in self.users()) and time.monotonic() < deadline:
                    time.sleep(0.3)
            except requests.RequestException:
                pass
        self.stop()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.remove_accounts()

    def remove_accounts(self) -> None:
        """Delete the system accounts this hub made for its users (and end what still runs as them)."""
        if os.geteuid() != 0:
            return
        for account in pwd.getpwall():
            if not account.pw_name.startswith(self.account_prefix):
                continue
            for pid in pids_of_uid(account.pw_uid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + patience(5)
            while True:
                done = subprocess.run(["userdel", account.pw_name], capture_output=True, timeout=patience(30))
                # 8: the account still has processes, which SIGKILL is ending.
                if done.returncode != 8 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)

    # ----- REST ----------------------------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A request to the hub's REST API as the test service (user names in ``path`` get escaped)."""
        kwargs.setdefault("timeout", patience(60))
        return self.session.request(method, f"{self.url}/hub/api{quote(path, safe='/?=&@~')}", **kwargs)

    def unshared_api(self, method: str, path: str) -> requests.Response:
        """:meth:`api` without the shared session, for requests sent from several threads at once."""
        headers = {"Authorization": f"token {self.token}"}
        url = f"{self.url}/hub/api{quote(path, safe='/?=&@~')}"
        return requests.request(method, url, headers=headers, timeout=patience(60))

    def service_post(
        self, service: str, path: str, token: str, body: Any, *, timeout: float = 120, wait_seconds: float = 120
    ) -> requests.Response:
        """A POST of ``body`` to ``/services/<service>/<path>`` through the proxy with ``token``, waiting up to
        ``wait_seconds`` while the hub is still starting the service (502, 503); both stretched by :func:`patience`."""
        deadline = time.monotonic() + patience(wait_seconds)
        while True:
            reply = requests.post(
                f"{self.url}/services/{service}/{path}",
                headers={"Authorization": f"token {token}"},
                json=body,
                timeout=patience(timeout),
            )
            if reply.status_code not in (502, 503) or time.monotonic() > deadline:
                return reply
            time.sleep(0.5)

    def users(self) -> Iterator[dict[str, Any]]:
        """Every user, with server state, following pagination."""
        url = "/users?include_stopped_servers=0&limit=200"
        while url:
            reply = self.api("GET", url, headers=PAGINATION)
            reply.raise_for_status()
            body = reply.json()
            yield from body["items"]
            nxt = body["_pagination"].get("next")
            url = f"/users?offset={nxt['offset']}&limit={nxt['limit']}" if nxt else ""

    def user(self, name: str) -> dict[str, Any]:
        """One user's model, with server state."""
        reply = self.api("GET", f"/users/{name}")
        reply.raise_for_status()
        return reply.json()

    def create_user(self, name: str) -> None:
        """Create a user (201), or accept that it exists (409)."""
        reply = self.api("POST", f"/users/{name}")
        assert reply.status_code in (201, 409), reply.text

    def user_token(self, name: str) -> str:
        """A new API token of ``name``, with that user's permissions (to reach their server)."""
        reply = self.api("POST", f"/users/{name}/tokens", json={"note": "e2e", "expires_in": 3600})
        reply.raise_for_status()
        return reply.json()["token"]

    def start_server(self, user: str, options: dict[str, Any] | None, name: str = "") -> requests.Response:
        """POST the server start; returns the reply (201, 202 or an error)."""
        body = None if options is None else {"user_options": options}
        return self.api("POST", server_path(user, name), json=body)

    def wait_ready(self, user: str, name: str = "", timeout: float = 90) -> dict[str, Any]:
        """Wait until the server is ready (``timeout`` stretched by :func:`patience`); returns its model."""
        timeout = patience(timeout)
        deadline = time.monotonic() + timeout
        server: dict[str, Any] = {}
        while time.monotonic() < deadline:
            server = self.user(user).get("servers", {}).get(name, {})
            if server.get("ready"):
                return server
            if not server:
                raise AssertionError(f"{user}'s server {name!r} is gone:\n{self.log_tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"{user}'s server {name!r} not ready in {timeout:.0f} s: {server}\n{self.log_tail()}")

    def stop_server(self, user: str, name: str = "", timeout: float = 60) -> None:
        """Stop a server and wait until the hub no longer lists it (``timeout`` stretched by :func:`patience`)."""
        reply = self.api("DELETE", server_path(user, name))
        assert reply.status_code in (202, 204, 400, 404), reply.text
        timeout = patience(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if name not in self.user(user).get("servers", {}):
                return
            time.sleep(0.3)
        raise TimeoutError(f"{user}'s server {name!r} did not stop in {timeout:.0f} s:\n{self.log_tail()}")

    def progress_events(self, user: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Read the server-sent progress events of a pending spawn until it ends (``timeout`` stretched)."""
        timeout = patience(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.api("GET", f"/users/{user}/server/progress", stream=True, timeout=timeout)
            if reply.status_code == 200:
                events = []
                for line in reply.iter_lines(decode_unicode=True):
                    if isinstance(line, str) and line.startswith("data:"):
                        event = json.loads(line[len("data:") :])
                        events.append(event)
                        if event.get("ready") or event.get("failed"):
                            break
                return events
            time.sleep(0.05)
        raise TimeoutError("no progress stream")


def server_path(user: str, name: str = "") -> str:
    """The REST path of ``user``'s default server, or of their server ``name``."""
    return f"/users/{user}/servers/{name}" if name else f"/users/{user}/server"


def let_accounts_through(*paths: Path) -> None:
    """Let other accounts traverse (``o+x``, never list) the folders above ``paths``: the test data directory lives
    under pytest's private temporary folder, and the servers' accounts must reach their workspaces, the venv and the
    Python it was made from (under /root with pyenv)."""
    for path in paths:
        for folder in [path.resolve(), *path.resolve().parents]:
            st = folder.stat()
            if st.st_uid == 0 and not st.st_mode & stat.S_IXOTH:
                folder.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def pids_of_uid(uid: int) -> list[int]:
    """The processes that run as ``uid`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


GPU_INVENTORY = [
    {"index": 0, "uuid": "GPU-00000000-fake-0000-0000-000000000000", "name": "NVIDIA A100 80GB", "memory_gb": 80},
    {"index": 1, "uuid": "GPU-11111111-fake-1111-1111-111111111111", "name": "NVIDIA A100 80GB", "memory_gb": 80},
]
