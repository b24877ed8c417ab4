"""Start the Drive emulator as a process and drive its control API from tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.patience import patience

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ServiceAccount:
    """A service account registered with the emulator, and its Google-format JSON key."""

    email: str
    key: dict[str, str]

    def write_key_file(self, path: Path) -> Path:
        """Write the JSON key as Google's console would hand it out."""
        path.write_text(json.dumps(self.key))
        path.chmod(0o600)
        return path


@dataclass(frozen=True)
class UserGrant:
    """The tokens a user's OAuth consent gave one client (what the authenticator would store)."""

    email: str
    client_id: str
    client_secret: str
    access_token: str
    refresh_token: str
    expires_in: int


class DriveEmulatorClient:
    """The control API of a running emulator at ``url``."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.token_uri = f"{self.url}/token"
        self.http = requests.Session()

    def _call(self, method: str, what: str, body: dict | None = None, **params: Any) -> Any:
        response = self.http.request(method, f"{self.url}/_emulator/{what}", json=body, params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        """Forget every account, token, file, session, fault and logged request."""
        self._call("POST", "reset", {})

    def service_account(self, email: str) -> ServiceAccount:
        """Register a new service account with a fresh RSA key; its JSON key's ``token_uri`` points here."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public_pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        private_pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._call("POST", "service_accounts", {"client_email": email, "public_key_pem": public_pem.decode()})
        key = {
            "type": "service_account",
            "project_id": "dolab-test",
            "private_key_id": os.urandom(20).hex(),
            "private_key": private_pem.decode(),
            "client_email": email,
            "client_id": str(int.from_bytes(os.urandom(8), "big")),
            "auth_uri": f"{self.url}/o/oauth2/auth",
            "token_uri": self.token_uri,
        }
        return ServiceAccount(email=email, key=key)

    def oauth_client(self, client_id: str, client_secret: str) -> None:
        """Register an OAuth client (the hub's Google login client)."""
        self._call("POST", "oauth_clients", {"client_id": client_id, "client_secret": client_secret})

    def user_grant(self, email: str, client_id: str, client_secret: str, scopes: list[str] | None = None) -> UserGrant:
        """Tokens as if ``email`` consented to ``client_id`` (default scope ``drive.file``, offline access)."""
        tokens = self._call("POST", "users", {"email": email, "client_id": client_id, "scopes": scopes})
        return UserGrant(email=email, client_id=client_id, client_secret=client_secret, **tokens)

    def expire_access_tokens(self, email: str) -> None:
        """Make every access token of ``email`` invalid now (refresh tokens keep working)."""
        self._call("POST", "expire_access_tokens", {"email": email})

    def revoke(self, email: str) -> None:
        """Revoke every access and refresh token of ``email`` (as removing the app's access would)."""
        self._call("POST", "revoke", {"email": email})

    def share(self, file_id: str, email: str, role: str = "reader") -> None:
        """Share a file with another account."""
        self._call("POST", "share", {"file_id": file_id, "email": email, "role": role})

    def set_access_token_lifetime(self, seconds: int) -> None:
        """Lifetime of access tokens issued from now on."""
        self._call("POST", "settings", {"access_token_lifetime_seconds": seconds})

    def add_fault(
        self,
        status: int = 503,
        *,
        method: str | None = None,
        path: str | None = None,
        query: str | None = None,
        times: int = 1,
        skip: int = 0,
        retry_after: int | None = None,
        action: str = "status",
        delay_seconds: float = 0.0,
        html: bool = False,
    ) -> None:
        """Fail the next ``times`` matching requests (after letting ``skip`` through); see ``state.Fault``."""
        self._call(
            "POST",
            "faults",
            {
                "status": status,
                "method": method,
                "path": path,
                "query": query,
                "times": times,
                "skip": skip,
                "retry_after": retry_after,
                "action": action,
                "delay_seconds": delay_seconds,
                "html": html,
            },
        )

    def clear_faults(self) -> None:
        """Disarm every fault."""
        self._call("DELETE", "faults")

    def requests(self) -> list[dict[str, Any]]:
        """Every API request served so far: method, path, query, status, account, Content-Range, body size."""
        return list(self._call("GET", "requests"))

    def clear_requests(self) -> None:
        """Empty the request log."""
        self._call("DELETE", "requests")

    def files(self, email: str | None = None) -> list[dict[str, Any]]:
        """Every file (optionally only those ``email`` owns), trashed or not, bypassing access checks."""
        params = {"email": email} if email else {}
        return list(self._call("GET", "files", **params))

    def sessions(self) -> list[dict[str, Any]]:
        """Resumable upload sessions not finished yet."""
        return list(self._call("GET", "sessions"))


class DriveEmulator:
    """The emulator as a child process on a free loopback port (``python -m tests.drive_emulator``)."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout_seconds: float = 30) -> DriveEmulatorClient:
        """Start the process and wait for it to listen (``timeout_seconds`` stretched by :func:`patience`); returns a
        control client."""
        log = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.drive_emulator", "--host", "127.0.0.1", "--port", "0"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        ready = threading.Event()
        lines: list[str] = []

        def read_banner() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                lines.append(line)
                if line.startswith("DRIVE_EMULATOR_READY "):
                    ready.set()
                    return

        threading.Thread(target=read_banner, daemon=True).start()
        if not ready.wait(patience(timeout_seconds)):
            self.stop()
            raise RuntimeError(f"The Drive emulator did not start: {''.join(lines)}")
        self.url = lines[-1].split()[1]
        return DriveEmulatorClient(self.url)

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
