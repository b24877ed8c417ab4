"""The remote workspace source: a real jupyter-server process on loopback, a real S3 server (moto_server).

Each server runs ``python -m jupyter_server`` in its own folder, with a token and a base URL like a hub's
single-user server; the tests write files into that folder directly (as a user's kernel would) and back it up and
restore it only through the server's REST API.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from dolab_services.sync.contents import RemoteError, RemoteServer, parse_time_ns
from dolab_services.sync.engine import SyncEngine, SyncPolicy
from dolab_services.sync.manifest import CHUNK_THRESHOLD_BYTES
from dolab_services.sync.remote import backup_remote, restore_remote
from dolab_services.sync.s3 import S3Store
from dolab_services.sync.workspace import Excludes

from ..patience import patience
from .conftest import S3Server, _free_port
from .treeutil import MiB, big_file, write

BASE_URL = "/user/alice/"
#: Small, so a few hundred KiB already go up in several chunks.
CHUNK = 64 * 1024


@dataclass
class JupyterServer:
    """A running jupyter-server: its folder, its own address (base URL included) and its token."""

    root: Path
    url: str
    token: str
    proc: subprocess.Popen

    def client(self, **kwargs: object) -> RemoteServer:
        return RemoteServer(self.url, self.token, chunk_bytes=CHUNK, **kwargs)  # type: ignore[arg-type]

    def last_activity(self) -> str:
        reply = requests.get(
            self.url + "api/status",
            params={"no_track_activity": "1"},
            headers={"Authorization": f"token {self.token}"},
            timeout=10,
        )
        reply.raise_for_status()
        return str(reply.json()["last_activity"])


def start_jupyter(root: Path, log_path: Path) -> JupyterServer:
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    token = secrets.token_hex(16)
    args = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--no-browser",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.root_dir={root}",
        f"--ServerApp.base_url={BASE_URL}",
        f"--IdentityProvider.token={token}",
    ]
    if os.geteuid() == 0:
        args.append("--allow-root")
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(log_path.parent / "config"),
        "JUPYTER_RUNTIME_DIR": str(log_path.parent / "runtime"),
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root, env=env)
    server = JupyterServer(root, f"http://127.0.0.1:{port}{BASE_URL}", token, proc)
    deadline = time.monotonic() + patience(60)
    while True:
        if proc.poll() is not None:
            pytest.fail(f"jupyter_server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            if requests.get(server.url + "api", timeout=1).status_code == 200:
                return server
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"jupyter_server did not answer in {patience(60):.0f} s")
        time.sleep(0.1)


@pytest.fixture
def jupyter(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A factory of jupyter-servers, each in a new empty folder; all stopped at the end of the test."""
    started: list[JupyterServer] = []

    def make() -> JupyterServer:
        base = tmp_path_factory.mktemp("jupyter")
        server = start_jupyter(base / "root", base / "server.log")
        started.append(server)
        return server

    yield make
    for server in started:
        server.proc.terminate()
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture
def store(s3_server: S3Server, bucket: str) -> S3Store:
    return s3_server.store(bucket, "backups/alice")


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def contents(root: Path) -> dict[str, str]:
    """path -> sha256 of every regular file under root ("dir" for empty folders)."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath) / name
            found[full.relative_to(root).as_posix()] = sha(full)
        if not dirnames and not filenames and Path(dirpath) != root:
            found[Path(dirpath).relative_to(root).as_posix()] = "dir"
    return found


def user_workspace(root: Path) -> None:
    write(root, "notebooks/analysis.ipynb", '{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    write(root, "notebooks/deep/er/still/notes.md", "# notes\n" * 100)
    write(root, "data/blob.bin", bytes(range(256)) * 1000)  # 256 KB: four upload chunks
    write(root, "données/résumé été ✓.txt", "unicode ✓ naïve")
    write(root, "日本語/ファイル.txt", "こんにちは")
    write(root, "spaces in name/a b.txt", "x")
    write(root, "empty.txt", b"")
    (root / "empty" / "folder").mkdir(parents=True)


def test_round_trip_through_the_contents_api(jupyter, store: S3Store, tmp_path: Path) -> None:
    source = jupyter()
    user_workspace(source.root)
    big_file(source.root / "models" / "weights.bin", CHUNK_THRESHOLD_BYTES + 3 * MiB)  # stored as pieces
    engine = SyncEngine(store, SyncPolicy(workers=4))
    before = source.last_activity()

    report = backup_remote(engine, source.client(), cache_path=tmp_path / "a.json.gz")

    assert report.snapshot is not None
    assert report.files == 8
    assert report.skipped == []
    manifest = engine.manifest()
    [weights] = [f for f in manifest.files if f.path == "models/weights.bin"]
    assert len(weights.chunks) == 5
    assert manifest.dirs == ["empty/folder"]
    # Read at its own address with no_track_activity: not the user's activity.
    assert source.last_activity() == before

    target = jupyter()
    client = target.client()
    assert client.is_empty()
    restored = restore_remote(engine, client, cache_path=tmp_path / "b.json.gz")

    assert restored.files == 8
    assert not client.is_empty()
    assert contents(target.root) == contents(source.root)
    assert (target.root / "notebooks" / "analysis.ipynb").read_bytes() == (
        source.root / "notebooks" / "analysis.ipynb"
    ).read_bytes()
    # The restore's replies filled the cache: backing the restored server up downloads nothing.
    again = backup_remote(engine, client, cache_path=tmp_path / "b.json.gz")
    assert again.hashed_files == 0
    assert again.uploaded_files == 0


def test_unchanged_rerun_downloads_nothing_and_a_change_only_itself(jupyter, store: S3Store, tmp_path: Path) -> None:
    server = jupyter()
    user_workspace(server.root)
    engine = SyncEngine(store)
    first = backup_remote(engine, server.client(), cache_path=tmp_path / "cache.json.gz")
    assert first.hashed_files == 7

    # With the cache, and without it (the last snapshot's sizes and times are enough).
    for cache in (tmp_path / "cache.json.gz", None):
        report = backup_remote(engine, server.client(), cache_path=cache)
        assert report.snapshot is None
        assert report.hashed_files == 0
        assert report.uploaded_files == 0

    time.sleep(0.01)
    with open(server.root / "notebooks" / "deep" / "er" / "still" / "notes.md", "a") as f:
        f.write("one more line\n")
    (server.root / "spaces in name" / "a b.txt").unlink()

    report = backup_remote(engine, server.client(), cache_path=tmp_path / "cache.json.gz")

    assert report.snapshot is not None
    assert report.hashed_files == 1
    assert report.uploaded_files == 1
    paths = {f.path for f in engine.manifest().files}
    assert "spaces in name/a b.txt" not in paths
    assert "notebooks/deep/er/still/notes.md" in paths


def test_excludes_size_cap_and_links_out_of_the_workspace(jupyter, store: S3Store, tmp_path: Path) -> None:
    server = jupyter()
    write(server.root, "keep.txt", "keep")
    write(server.root, "scratch/big.tmp", "temporary")
    write(server.root, "huge.bin", b"x" * 5000)
    write(server.root, ".ipynb_checkpoints/keep-checkpoint.txt", "checkpoint")
    secret = write(tmp_path, "outside/secret.txt", "not the user's workspace")
    os.symlink(secret, server.root / "escape.txt")
    policy = SyncPolicy(excludes=Excludes(globs=("*.tmp",), max_file_bytes=4096))

    report = backup_remote(SyncEngine(store, policy), server.client())

    assert [f.path for f in SyncEngine(store).manifest().files] == ["keep.txt"]
    skipped = dict(report.skipped)
    assert "over the 4096-byte cap" in skipped["huge.bin"]
    assert "refused to serve it" in skipped["escape.txt"]


class _LyingServer(BaseHTTPRequestHandler):
    """A contents API that reports paths leaving the workspace."""

    def do_GET(self) -> None:
        entries = [
            {"name": "../escape.txt", "path": "../escape.txt", "type": "file", "size": 1},
            {"name": "..", "path": "..", "type": "directory"},
            {"name": "ok.txt", "path": "../../etc/passwd", "type": "file", "size": 1},
            {"name": "/etc/passwd", "path": "/etc/passwd", "type": "file", "size": 1},
        ]
        body = json.dumps({"type": "directory", "name": "", "path": "", "content": entries}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_paths_the_server_reports_are_checked(store: S3Store) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _LyingServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        server = RemoteServer(f"http://127.0.0.1:{httpd.server_address[1]}/user/alice/", "t")
        tree = server.scan()
        assert tree.files == []
        assert len(tree.skipped) == 4
        assert all(why.startswith("refused") for _, why in tree.skipped)
        report = backup_remote(SyncEngine(store), server)
        assert report.files == 0
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_restore_into_an_empty_server_skips_what_the_api_cannot_write(jupyter, store: S3Store, tmp_path: Path) -> None:
    # A local backup (hidden file, symlink) restored into a remote server.
    local = tmp_path / "local"
    write(local, "work/a.txt", "a")
    write(local, ".config/settings.json", "{}")
    os.symlink("work/a.txt", local / "latest.txt")
    with open(os.path.join(os.fsencode(local), b"caf\xe9.txt"), "wb") as f:  # Latin-1: no UTF-8 name for the API
        f.write(b"latin-1")
    engine = SyncEngine(store)
    engine.backup(local)
    server = jupyter()
    (server.root / "work").mkdir()  # a new pod's image may make empty folders: still an empty workspace
    assert server.client().is_empty()

    report = restore_remote(engine, server.client())

    assert report.files == 1
    assert not server.client().is_empty()
    assert contents(server.root) == {"work/a.txt": sha(local / "work" / "a.txt")}


def test_a_wrong_token_or_a_dead_server_is_a_sentence(jupyter, store: S3Store) -> None:
    server = jupyter()
    write(server.root, "a.txt", "a")
    with pytest.raises(RemoteError, match="refused the hub's access"):
        backup_remote(SyncEngine(store), RemoteServer(server.url, "wrong-token"))
    with pytest.raises(RemoteError, match="is its address right"):
        backup_remote(SyncEngine(store), RemoteServer(server.url.replace("/alice/", "/bob/"), server.token))
    server.proc.terminate()
    server.proc.wait(10)
    with pytest.raises(RemoteError, match="could not be reached"):
        backup_remote(SyncEngine(store), server.client(timeout_seconds=5))
    assert SyncEngine(store).snapshots() == []


def test_last_modified_parses_to_nanoseconds() -> None:
    assert parse_time_ns("1970-01-01T00:00:01.000002Z") == 1_000_002_000
    assert parse_time_ns("1970-01-01T00:00:01.5+00:00") == 1_500_000_000
    assert parse_time_ns(None) == 0
    assert parse_time_ns("yesterday") == 0
