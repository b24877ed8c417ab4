"""Attacks on the sync service's restore list and its shared pool (issue 12, item 6), through the real service's
HTTP API on a real hub (the shipped config, the real proxy, the dolab-sync service it manages, moto_server as S3).

The restore's ``paths`` were matched entries x paths, with no bound on the list, on the service's pool of 2 threads
that every user's backups share, and a user could pile up any number of requests. So Mallory:

- posts a restore naming 5,000 paths, or one path of 5,000 characters: refused at once with a sentence, nothing
  written;
- posts the largest list allowed (1,000 paths of 4,096 characters) against a restore point of 33,000 files: it
  costs about what a restore naming one path costs, and writes one file;
- starts a long restore, queues another, and piles up more requests: Bob's backup completes while her first
  restore runs, and the requests beyond the few that may wait are refused at once.

(That a user's turn lasts as long as her work, even past the service's timeout, is checked on the scheduler itself
in tests/sync/test_backups_turns.py: the shipped timeout is an hour.)

Mallory's restore point holds tens of thousands of (empty) files. It is written straight into the store, as the
service would write it after backing up such a workspace: making the files on disk would only slow the test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from dolab_services.sync.config import user_prefix
from dolab_services.sync.engine import SyncEngine
from dolab_services.sync.manifest import FileRecord, new_snapshot_id, snapshot_key
from dolab_services.sync.s3 import S3Store

from ..e2e.hub import REPO, Hub, free_port
from ..patience import patience
from ..sync import conftest as sync_conftest
from ..sync.conftest import S3Server
from ..sync.treeutil import write

s3_server = sync_conftest.s3_server  # the session's moto_server (a fixture of tests/sync)

pytestmark = pytest.mark.e2e

PREFIX = "paths-attack"
#: The documented bounds (README, "Workspace backup"): paths in one restore, characters in one path, and a user's
#: backups and restores that may wait for their turn.
MAX_PATHS = 1000
MAX_PATH_CHARS = 4096
MAX_WAITING_PER_USER = 4
#: Files in Mallory's restore point that the long restore writes, and those only the matcher reads.
SLOW_FILES = 3000
MANY_FILES = 30000
EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@dataclass
class Site:
    """The hub, its workspace root, and the users' API tokens."""

    hub: Hub
    workspaces: Path
    tokens: dict[str, str]

    def workspace(self, user: str) -> Path:
        """The user's workspace folder, where the service restores."""
        return self.workspaces / user_prefix(user)

    def api(self, user: str, path: str, body: dict[str, object], timeout: float = 300) -> requests.Response:
        """A POST to the sync service's API through the hub's proxy, as ``user``."""
        return self.hub.service_post("dolab-sync", f"api/{path}", self.tokens[user], body, timeout=timeout)


@pytest.fixture(scope="module")
def site(s3_server: S3Server) -> Iterator[Site]:
    base = Path(tempfile.mkdtemp(prefix="dolab-paths-attack-"))
    workspaces = base / "workspaces"
    workspaces.mkdir()
    bucket = s3_server.new_bucket()
    env = {
        "DOLAB_WORKSPACE_ROOT": str(workspaces),
        **s3_server.sync_env(bucket, prefix=PREFIX),
        "DOLAB_SYNC_INTERVAL_MINUTES": "0",
        "DOLAB_SYNC_PORT": str(free_port()),
        "PYTHONPATH": str(REPO),  # the hub and its services import this checkout
    }
    hub = Hub(base / "hub", env=env).start()  # the shipped service: its pool of 2 threads, its timeout
    try:
        tokens = {}
        for user in ("mallory", "bob"):
            hub.create_user(user)
            tokens[user] = hub.user_token(user)
        site = Site(hub, workspaces, tokens)
        _seed_mallory(site, s3_server.store(bucket, f"{PREFIX}/{user_prefix('mallory')}"))
        write(site.workspace("bob"), "thesis.md", "bob's thesis")
        yield site
    finally:
        hub.shutdown()
        shutil.rmtree(base, ignore_errors=True)


def _seed_mallory(site: Site, store: S3Store) -> None:
    """Mallory's workspace and her latest restore point: her notes, ``slow/`` (SLOW_FILES files) and ``many/``
    (MANY_FILES files); then she deletes her notes."""
    ws = site.workspace("mallory")
    write(ws, "notes.txt", "mallory's notes")
    write(ws, "seed/empty", "")
    engine = SyncEngine(store)
    engine.backup(ws)
    manifest = engine.manifest()
    extra = [f"slow/f{i:05d}" for i in range(SLOW_FILES)] + [f"many/f{i:06d}" for i in range(MANY_FILES)]
    manifest.files = sorted(
        [*manifest.files, *(FileRecord(path, 0, 1_700_000_000 * 10**9, 0o644, EMPTY_SHA) for path in extra)],
        key=lambda f: f.path,
    )
    manifest.snapshot = new_snapshot_id()
    engine.store.put_bytes(snapshot_key(manifest.snapshot), manifest.to_bytes())
    (ws / "notes.txt").unlink()


def tree(root: Path) -> set[str]:
    """Every path under ``root``."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def restored(folder: Path) -> int:
    """How many files a restore has finished in ``folder`` (not its temporary files)."""
    try:
        return sum(1 for name in os.listdir(folder) if name.startswith("f"))
    except FileNotFoundError:
        return 0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds (stretched by :func:`patience`)."""
    timeout = patience(timeout)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.1)


def test_a_huge_list_of_paths_is_refused_and_nothing_is_written(site: Site) -> None:
    ws = site.workspace("mallory")
    before = tree(ws)

    many = site.api("mallory", "restore", {"paths": [f"many/f{i:06d}" for i in range(4999)] + ["notes.txt"]})
    long_one = site.api("mallory", "restore", {"paths": ["notes.txt", "many/" + "x" * 5000]})
    long_into = site.api("mallory", "restore", {"paths": ["notes.txt"], "into": "y" * 5000})

    assert many.status_code == 400, many.text
    assert f"at most {MAX_PATHS} paths" in many.json()["message"]
    assert long_one.status_code == 400, long_one.text
    assert f"at most {MAX_PATH_CHARS}" in long_one.json()["message"]
    assert long_into.status_code == 400, long_into.text
    assert len(many.text) < 500 and len(long_one.text) < 500  # a sentence, not the list
    assert tree(ws) == before


def test_the_largest_list_allowed_costs_what_one_path_costs(site: Site) -> None:
    folder = "/".join(["x" * 200] * 20)
    folder += "/" + "y" * (MAX_PATH_CHARS - len(folder) - 6)
    paths = [f"{folder}/{i:04d}" for i in range(MAX_PATHS - 1)] + ["notes.txt"]
    assert max(map(len, paths)) == MAX_PATH_CHARS

    def timed(body: dict[str, object]) -> tuple[float, requests.Response]:
        started = time.monotonic()
        reply = site.api("mallory", "restore", body)
        return time.monotonic() - started, reply

    one_seconds, one = timed({"paths": ["notes.txt"], "into": "one"})
    all_seconds, reply = timed({"paths": paths})

    assert one.status_code == 200 and reply.status_code == 200, (one.text, reply.text)
    assert one.json()["files"] == reply.json()["files"] == 1
    assert (site.workspace("mallory") / "notes.txt").read_text() == "mallory's notes"
    # Matched entries x paths, the long list costs 33 million comparisons of 4 KiB strings (tens of seconds of
    # the service's CPU) where one path costs 33,000; by the prefix tree, both cost 33,000 walks of a step or two.
    assert all_seconds < 3 * one_seconds + 5, f"{MAX_PATHS} paths took {all_seconds:.1f} s, one {one_seconds:.1f} s"


def test_one_users_long_restores_never_starve_another_users_backup(site: Site) -> None:
    ws = site.workspace("mallory")
    pool = ThreadPoolExecutor(16)
    try:
        # Her first long restore starts; she queues a second one behind it.
        first = pool.submit(site.api, "mallory", "restore", {"paths": ["slow"], "into": "r1"})
        wait_until(lambda: restored(ws / "r1" / "slow") > 0, "the first restore starting")
        second = pool.submit(site.api, "mallory", "restore", {"paths": ["slow"], "into": "r2"})

        # Bob's backup takes the pool's other thread while her restore still runs.
        backup = site.api("bob", "backup", {})
        r1_done, r2_done = restored(ws / "r1" / "slow"), restored(ws / "r2" / "slow")

        assert backup.status_code == 200, backup.text
        assert backup.json()["snapshot"] or backup.json()["previous"]
        assert r1_done < SLOW_FILES, "Bob's backup waited until Mallory's restore was over"
        assert r2_done == 0, "Mallory's second restore ran beside her first one"

        # More requests of hers while one runs: a few wait for her turn, the rest are refused at once.
        flood: list[Future[requests.Response]] = [
            pool.submit(site.api, "mallory", "restore", {"paths": ["notes.txt"], "into": f"flood{i}"})
            for i in range(MAX_WAITING_PER_USER + 4)
        ]
        wait_until(lambda: sum(f.done() for f in flood) >= 4, "the refusals of her extra requests", timeout=60)
        refused = [f.result() for f in flood if f.done()]  # the others wait for the restores before them
        assert all(r.status_code == 429 for r in refused), (
            f"her requests beyond {MAX_WAITING_PER_USER} waiting were not refused: {[r.text for r in refused]}"
        )
        assert "waiting already" in refused[0].json()["message"]

        # Nothing is lost: what she queued runs in her turn.
        assert first.result(timeout=600).json()["files"] == SLOW_FILES
        assert second.result(timeout=600).json()["files"] == SLOW_FILES
        replies = [f.result(timeout=300) for f in flood]
        assert {r.status_code for r in replies} == {200, 429}, [r.text for r in replies]
        assert sum(r.status_code == 200 for r in replies) >= MAX_WAITING_PER_USER - 1
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
