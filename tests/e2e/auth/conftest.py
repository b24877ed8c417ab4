"""A real OpenID Connect provider for the login tests here, the authenticator's (tests/spawner/auth) and the security
tests: npm's oidc-provider (tests/oidc/server.mjs) on loopback.

`make test` installs it into .dolab/oidc from tests/oidc/package-lock.json. Without Node or the package the tests
are skipped, or fail with CI=true, where `make test` must have installed them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.hub import free_port
from tests.patience import patience

REPO = Path(__file__).resolve().parents[3]
OIDC_MODULES = REPO / ".dolab" / "oidc"
SERVER_SCRIPT = REPO / "tests" / "oidc" / "server.mjs"
#: Access tokens live this long at the provider; the hub renews them this long before they expire.
ACCESS_TOKEN_TTL = 90


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing: `make test` installs it (test-parts)")
    pytest.skip(f"{what} is missing (make test-parts installs it)")


@dataclass
class TestUser:
    """A user of the test provider."""

    __test__ = False  # a helper, not a test class, where test modules import it

    name: str
    password: str
    groups: list[str]
    admin: bool = False


@dataclass
class OidcProvider:
    """The running provider: its issuer URL, users, and the test-only controls of tests/oidc/server.mjs."""

    url: str
    users: dict[str, TestUser]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def register_client(self, redirect_uri: str) -> tuple[str, str]:
        """Register a confidential client (RFC 7591); returns (client_id, client_secret)."""
        reply = requests.post(
            f"{self.url}/reg",
            json={
                "redirect_uris": [redirect_uri],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "client_secret_post",
            },
            timeout=10,
        )
        reply.raise_for_status()
        body = reply.json()
        return body["client_id"], body["client_secret"]

    def set_mode(self, mode: str) -> None:
        """ok, down (drop back-channel connections) or garbage (answer HTML) on discovery, token, userinfo."""
        requests.post(f"{self.url}/__control/mode", json={"mode": mode}, timeout=10).raise_for_status()

    def set_users(self, users: dict[str, TestUser], **extra: dict[str, Any]) -> None:
        """Add accounts at the provider, or change what it knows of them (their groups), from now on.

        ``extra`` maps a login to more of its claims (``{"eve": {"hd": "elsewhere.example"}}``).
        """
        self.users.update(users)
        body = {
            u.name: {"password": u.password, "groups": u.groups, "admin": u.admin, **extra.get(u.name, {})}
            for u in users.values()
        }
        requests.post(f"{self.url}/__control/users", json=body, timeout=10).raise_for_status()

    def stats(self) -> dict[str, Any]:
        """How many grants of each type the provider answered."""
        return requests.get(f"{self.url}/__control/stats", timeout=10).json()

    def userinfo(self, access_token: str) -> requests.Response:
        """The provider's userinfo for an access token (200 while the token is valid)."""
        return requests.get(f"{self.url}/me", headers={"Authorization": f"Bearer {access_token}"}, timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the provider's log, for assertion messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def oidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """The provider, with four users: researchers (GPU plan), students (CPU plan) and an admin."""
    with running_provider(tmp_path_factory.mktemp("oidc")) as provider:
        yield provider


@contextlib.contextmanager
def running_provider(workdir: Path) -> Iterator[OidcProvider]:
    """Start the provider (its log in ``workdir``) with the users ana, bob, carol and dave; stop it at the end."""
    node = shutil.which("node")
    if node is None:
        _missing("Node.js")
    if not (OIDC_MODULES / "node_modules" / "oidc-provider").is_dir():
        _missing(f"npm oidc-provider in {OIDC_MODULES}")
    users = {
        "ana": TestUser("ana", secrets.token_urlsafe(12), ["researchers"]),
        "bob": TestUser("bob", secrets.token_urlsafe(12), ["students"]),
        "carol": TestUser("carol", secrets.token_urlsafe(12), ["lab-admins", "students"], admin=True),
        "dave": TestUser("dave", secrets.token_urlsafe(12), ["students"]),
    }
    port = free_port()
    log_path = workdir / "oidc.log"
    env = {
        **os.environ,
        "DOLAB_OIDC_MODULES": str(OIDC_MODULES),
        "DOLAB_OIDC_PORT": str(port),
        "DOLAB_OIDC_ACCESS_TOKEN_TTL": str(ACCESS_TOKEN_TTL),
        "DOLAB_OIDC_USERS": json.dumps(
            {u.name: {"password": u.password, "groups": u.groups, "admin": u.admin} for u in users.values()}
        ),
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(node), str(SERVER_SCRIPT)], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    provider = OidcProvider(f"http://127.0.0.1:{port}", users, log_path, proc)
    try:
        deadline = time.monotonic() + patience(30)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"oidc-provider exited with {proc.returncode}:\n{provider.log_tail()}")
            try:
                if requests.get(f"{provider.url}/.well-known/openid-configuration", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"oidc-provider did not answer in {patience(30):.0f} s:\n{provider.log_tail()}")
            time.sleep(0.1)
        yield provider
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
