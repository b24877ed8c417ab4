"""Fixtures of the monitor's tests: a real PostgreSQL server for the ledger, started once per session.

The server is Debian's ``postgresql`` package (``make test-parts`` installs it): ``initdb`` and ``pg_ctl`` in a
temporary directory, listening on a free loopback port only (no Unix socket outside that directory), trust
authentication for loopback, stopped at the end of the session. PostgreSQL refuses to run as root, so as root the
commands run as the ``postgres`` system user (``runuser``). Without PostgreSQL the tests that need it are skipped,
except with ``CI=true``, where they fail.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.patience import patience


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing test part fails; make test-parts installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of an empty database on a real PostgreSQL server on 127.0.0.1."""
    try:
        import psycopg
    except ImportError:
        _missing("psycopg is not installed (pip install -e '.[test]')")
    bindir = _pg_bin()
    if bindir is None:
        _missing("PostgreSQL is not installed (apt-get install postgresql)")
        return
    root = Path(tempfile.mkdtemp(prefix="dolab-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            _missing("runuser is missing: PostgreSQL cannot run as root")
        run_as = [str(runuser), "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    os.chmod(root, 0o700)
    data, port = root / "data", _free_port()

    def pg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*run_as, *args], capture_output=True, text=True, timeout=patience(120), check=False)

    result = pg(str(bindir / "initdb"), "-D", str(data), "-U", "dolab", "--auth=trust", "-E", "UTF8", "--no-sync")
    if result.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {result.stderr or result.stdout}")
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off"
    result = pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
    if result.returncode != 0:
        log = (root / "log").read_text(errors="replace") if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {result.stderr or result.stdout}\n{log}")
    try:
        with psycopg.connect(f"host=127.0.0.1 port={port} user=dolab dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE dolab_ledger")
        yield f"postgresql+psycopg://dolab@127.0.0.1:{port}/dolab_ledger"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
