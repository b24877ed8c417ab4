"""A real S3 server for the sync tests: ``moto_server`` on a free loopback port, for the whole session.

Without moto_server the tests skip, except on CI (``CI=true``), where `make test` must have installed it (the
``test`` extra) and a missing server fails them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import requests

from dolab_services.sync.s3 import S3Store
from tests.drive_emulator.conftest import drive, drive_emulator_process  # noqa: F401 - fixtures of the Drive tests
from tests.patience import patience

CREDENTIALS = {"access_key_id": "dolab-test", "secret_access_key": "dolab-test-secret", "region_name": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moto_server() -> str | None:
    beside = Path(sys.executable).parent / "moto_server"
    return str(beside) if beside.exists() else shutil.which("moto_server")


@dataclass(frozen=True)
class S3Server:
    """A running moto_server."""

    endpoint_url: str

    def client(self):  # type: ignore[no-untyped-def]
        """A plain boto3 client of the server (for checks beside the store)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=CREDENTIALS["access_key_id"],
            aws_secret_access_key=CREDENTIALS["secret_access_key"],
            region_name=CREDENTIALS["region_name"],
        )

    def new_bucket(self) -> str:
        """A new, empty bucket."""
        name = f"dolab-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def sync_env(self, bucket: str | None = None, prefix: str = "") -> dict[str, str]:
        """The hub's ``DOLAB_SYNC_S3_*`` variables for backups to ``bucket`` (default: a new one) on this server."""
        env = {
            "DOLAB_SYNC_S3_BUCKET": bucket or self.new_bucket(),
            "DOLAB_SYNC_S3_ENDPOINT": self.endpoint_url,
            "DOLAB_SYNC_S3_REGION": CREDENTIALS["region_name"],
            "DOLAB_SYNC_S3_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
            "DOLAB_SYNC_S3_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
        }
        if prefix:
            env["DOLAB_SYNC_S3_PREFIX"] = prefix
        return env

    def store(self, bucket: str, prefix: str, **kwargs: object) -> S3Store:
        """An S3Store of this server."""
        return S3Store(bucket, prefix, endpoint_url=self.endpoint_url, **CREDENTIALS, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto_server on 127.0.0.1, stopped at the end of the session."""
    exe = _moto_server()
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("moto_server is not installed (pip install 'moto[server]'): the sync tests need it")
        pytest.skip("moto_server is not installed (pip install -e '.[test]')")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + patience(60)
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
            try:
                requests.get(url, timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer in {patience(60):.0f} s")
                time.sleep(0.1)
        yield S3Server(url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A new bucket on the session's S3 server."""
    return s3_server.new_bucket()
