"""Attacks on the sync service's access to workspaces (issue 12, items 2 and 10).

The sync service runs as root and writes into workspaces their users control. Each test acts as the user would:

- a process of hers swaps a folder of her workspace for a symlink to the host's files, as fast as it can, while the
  service restores (into a sub-folder, or some paths) again and again, through :class:`Backups` (what the service's
  API calls) and through the real service's HTTP API on a real hub: nothing may appear outside the workspace;
- she plants a symlink where a restored file goes: the restore must replace the link, never write through it;
- she makes links that stay inside by their text but leave through other links (``a/up -> ..``,
  ``chain -> a/up/../bob/x``): they must not be backed up, nor restored from a tampered manifest;
- a private folder (0700 ``.ssh``) and a file whose name is not UTF-8 must come back as they were.

The hostile process runs as an unprivileged account (``nobody``) when the tests run as root, as CI does; the
"host" folder is root's, so only the service could have written there.
"""

from __future__ import annotations

import asyncio
import ctypes
import gzip
import multiprocessing
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from dolab_services.sync.backups import Backups
from dolab_services.sync.config import SyncSettings, user_prefix
from dolab_services.sync.engine import SyncEngine
from dolab_services.sync.manifest import Manifest, snapshot_key
from dolab_services.sync.store import StoreError
from dolab_services.sync.workspace import LinkEntry, UnsafePath

from ..e2e.hub import Hub, free_port
from ..sync import conftest as sync_conftest
from ..sync.conftest import CREDENTIALS, S3Server
from ..sync.treeutil import describe, write

s3_server = sync_conftest.s3_server  # the session's moto_server (a fixture of tests/sync)

PREFIX = "attack-backups"
#: The account the hostile process runs as when the tests run as root.
NOBODY = 65534


def _swap_forever(pairs: list[tuple[bytes, bytes]], uid: int, ready: Any) -> None:
    """The hostile process: drop to the user's account, then swap each (folder, symlink) pair without pause,
    atomically (renameat2 RENAME_EXCHANGE), or by three renames where the file system lacks it."""
    if os.geteuid() == 0 and uid != 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    libc = ctypes.CDLL(None, use_errno=True)
    ready.set()
    while True:
        time.sleep(0.0001)  # thousands of swaps a second, and a core left for the service on a small machine
        for a, b in pairs:
            if libc.renameat2(-100, a, -100, b, 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
                try:
                    os.rename(a, a + b".x")
                    os.rename(b, a)
                    os.rename(a + b".x", b)
                except OSError:
                    pass


@dataclass
class Arena:
    """A 0755 folder (unlike pytest's 0700 ones, so ``nobody`` can reach the workspaces) with the workspace root,
    a "host" folder of root's beside it, and the hash caches."""

    base: Path
    uid: int

    @property
    def workspaces(self) -> Path:
        return self.base / "workspaces"

    @property
    def host(self) -> Path:
        return self.base / "host"

    def workspace(self, user: str) -> Path:
        """``user``'s workspace folder, owned by the hostile account."""
        ws = self.workspaces / user_prefix(user)
        ws.mkdir(parents=True, exist_ok=True)
        os.chown(ws, self.uid, self.uid)
        return ws

    def outside(self) -> dict[str, tuple]:
        """Everything outside the workspaces (to compare before and after an attack)."""
        return {k: v for k, v in describe(self.base).items() if not k.startswith(("workspaces/", "cache"))}


@pytest.fixture
def arena() -> Iterator[Arena]:
    base = Path(tempfile.mkdtemp(prefix="dolab-attack-"))
    base.chmod(0o755)
    uid = NOBODY if os.geteuid() == 0 else os.geteuid()
    arena = Arena(base, uid)
    arena.workspaces.mkdir()
    write(arena.host, "victim.txt", "the host's own file")
    write(arena.host, "inbox/readme.txt", "a host folder")
    arena.host.chmod(0o755)
    yield arena
    shutil.rmtree(base)


class Swapper:
    """A hostile process of the workspace's user (forked: the user's account cannot run the test's Python)
    swapping folders and symlinks until the block ends."""

    def __init__(self, pairs: list[tuple[Path, Path]], uid: int) -> None:
        context = multiprocessing.get_context("fork")
        self.ready = context.Event()
        encoded = [(os.fsencode(a), os.fsencode(b)) for a, b in pairs]
        self.proc = context.Process(target=_swap_forever, args=(encoded, uid, self.ready), daemon=True)

    def __enter__(self) -> Swapper:
        self.proc.start()
        assert self.ready.wait(30), "the swapping process did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.join(30)


def settings_for(s3_server: S3Server) -> SyncSettings:
    return SyncSettings(
        bucket=s3_server.new_bucket(),
        endpoint_url=s3_server.endpoint_url,
        region=CREDENTIALS["region_name"],
        prefix=PREFIX,
        access_key_id=CREDENTIALS["access_key_id"],
        secret_access_key=CREDENTIALS["secret_access_key"],
        workers=2,
    )


def own(path: Path, uid: int) -> None:
    """Give everything under ``path`` to ``uid`` (what the user's own files are)."""
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)
    os.chown(path, uid, uid)


def seed(ws: Path, uid: int) -> None:
    """What mallory backs up, then the folders her process swaps: ``restored/a`` (in the middle of the ``into``
    she restores to) with a link to the arena (so ``a/host`` is the host folder), and ``notes`` with a link to
    the host folder (which has an ``inbox`` like hers)."""
    write(ws, "top.txt", "mallory's top file")
    write(ws, "notes/inbox/a.txt", "mallory's note")
    write(ws, "notes/inbox/b.txt", "another note")
    (ws / "restored" / "a" / "host").mkdir(parents=True)
    own(ws, uid)


def swap_pairs(ws: Path, arena: Arena) -> list[tuple[Path, Path]]:
    os.symlink(str(arena.base), ws / "restored" / "a-swap")
    os.symlink(str(arena.host), ws / "notes-swap")
    for link in (ws / "restored" / "a-swap", ws / "notes-swap"):
        os.chown(link, arena.uid, arena.uid, follow_symlinks=False)
    return [(ws / "restored" / "a", ws / "restored" / "a-swap"), (ws / "notes", ws / "notes-swap")]


# ----- item 2: restores raced by a swapping process --------------------------------------------------------


def test_a_swapping_folder_never_lets_a_restore_write_outside(arena: Arena, s3_server: S3Server) -> None:
    backups = Backups(settings_for(s3_server), arena.workspaces, arena.base / "cache")
    ws = arena.workspace("mallory")
    seed(ws, arena.uid)
    before = arena.outside()
    outcomes: dict[str, int] = {"restored": 0, "refused": 0}

    async def attack() -> None:
        await backups.backup("mallory")
        with Swapper(swap_pairs(ws, arena), arena.uid):
            for i in range(15):
                for paths, into in ((None, "restored/a/host"), (["notes/inbox"], ""), (["top.txt"], f"r{i}/a")):
                    try:
                        await backups.restore("mallory", None, paths, into)
                        outcomes["restored"] += 1
                    except (UnsafePath, OSError):
                        outcomes["refused"] += 1  # a folder on the way was a symlink at that moment

    try:
        asyncio.run(attack())
    finally:
        backups.close()

    assert arena.outside() == before, "a restore wrote outside the workspace"
    assert outcomes["restored"] > 5, outcomes  # the attack raced real restores, not only refusals


def test_a_symlink_planted_at_a_restored_file_is_replaced_not_followed(arena: Arena, s3_server: S3Server) -> None:
    backups = Backups(settings_for(s3_server), arena.workspaces, arena.base / "cache")
    ws = arena.workspace("mallory")
    write(ws, "top.txt", "mallory's top file")
    write(ws, "sub/deep.txt", "mallory's deep file")
    own(ws, arena.uid)
    before = arena.outside()

    async def attack() -> None:
        await backups.backup("mallory")
        for rel, target in (("top.txt", "victim.txt"), ("sub/deep.txt", "new-file.txt")):
            (ws / rel).unlink()
            os.symlink(str(arena.host / target), ws / rel)
        await backups.restore("mallory", None, None)
        (ws / "into" / "sub").mkdir(parents=True)
        os.symlink(str(arena.host / "victim.txt"), ws / "into" / "top.txt")
        os.symlink(str(arena.host / "elsewhere.txt"), ws / "into" / "sub" / "deep.txt")
        await backups.restore("mallory", None, None, "into")

    try:
        asyncio.run(attack())
    finally:
        backups.close()

    assert arena.outside() == before
    for rel in ("top.txt", "sub/deep.txt", "into/top.txt", "into/sub/deep.txt"):
        assert not (ws / rel).is_symlink() and (ws / rel).is_file(), rel
    assert (ws / "into" / "top.txt").read_text() == "mallory's top file"


@pytest.fixture(scope="module")
def hub(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hub, Arena]]:
    base = Path(tempfile.mkdtemp(prefix="dolab-attack-hub-"))
    base.chmod(0o755)
    arena = Arena(base, NOBODY if os.geteuid() == 0 else os.geteuid())
    arena.workspaces.mkdir()
    write(arena.host, "victim.txt", "the host's own file")
    write(arena.host, "inbox/readme.txt", "a host folder")
    env = {
        "DOLAB_WORKSPACE_ROOT": str(arena.workspaces),
        **s3_server.sync_env(prefix=PREFIX),
        "DOLAB_SYNC_INTERVAL_MINUTES": "0",
        "DOLAB_SYNC_PORT": str(free_port()),
    }
    hub = Hub(tmp_path_factory.mktemp("sync-attack-hub"), env=env).start()
    try:
        yield hub, arena
    finally:
        hub.shutdown()
        shutil.rmtree(base)


def sync_api(hub: Hub, token: str, path: str, body: dict[str, Any], timeout: float = 120) -> requests.Response:
    """A POST to the sync service's API through the hub's proxy, as the token's user."""
    return hub.service_post("dolab-sync", f"api/{path}", token, body, timeout=timeout, wait_seconds=timeout)


@pytest.mark.e2e
def test_a_swapping_folder_never_lets_the_service_api_write_outside(hub: tuple[Hub, Arena]) -> None:
    server, arena = hub
    server.create_user("mallory")
    token = server.user_token("mallory")
    ws = arena.workspace("mallory")
    seed(ws, arena.uid)
    made = sync_api(server, token, "backup", {})
    assert made.status_code == 200, made.text
    before = arena.outside()
    codes: list[int] = []

    with Swapper(swap_pairs(ws, arena), arena.uid):
        for _ in range(15):
            codes.append(sync_api(server, token, "restore", {"into": "restored/a/host"}).status_code)
            codes.append(sync_api(server, token, "restore", {"paths": ["notes/inbox"]}).status_code)

    assert arena.outside() == before, f"the service wrote outside the workspace (replies {codes})"
    assert set(codes) <= {200, 400}, codes  # done, or refused with a sentence: never a 500
    assert codes.count(200) > 3, codes


# ----- item 10: links that leave through other links; private folders; names that are not UTF-8 ------------


def test_links_that_leave_through_other_links_are_not_backed_up(arena: Arena, s3_server: S3Server) -> None:
    settings = settings_for(s3_server)
    backups = Backups(settings, arena.workspaces, arena.base / "cache")
    bob = arena.workspace("bob")
    write(bob, "x/secret.txt", "bob's secret")
    ws = arena.workspace("mallory")
    (ws / "a").mkdir()
    os.symlink("..", ws / "a" / "up")  # stays inside: a/.. is the workspace
    os.symlink("a/up/../bob/x", ws / "chain")  # by its text a/bob/x; through a/up it is bob's folder
    os.symlink("a/up/a/up/..", ws / "twice")  # two links deep
    os.symlink("loop2", ws / "loop1")
    os.symlink("loop1", ws / "loop2")
    os.symlink("a/up/a", ws / "fine")  # through a link, and still inside
    own(ws, arena.uid)

    try:
        report = asyncio.run(backups.backup("mallory"))
    finally:
        backups.close()

    manifest = SyncEngine(settings.store_for("mallory")).manifest()
    assert {(link.path, link.target) for link in manifest.links} == {("a/up", ".."), ("fine", "a/up/a")}
    assert {"chain", "twice", "loop1", "loop2"} <= {path for path, _ in report.skipped}


def test_a_tampered_manifest_cannot_make_a_link_that_leaves(arena: Arena, s3_server: S3Server) -> None:
    settings = settings_for(s3_server)
    backups = Backups(settings, arena.workspaces, arena.base / "cache")
    ws = arena.workspace("mallory")
    write(ws, "a/file.txt", "mine")
    own(ws, arena.uid)
    engine = SyncEngine(settings.store_for("mallory"))
    try:
        asyncio.run(backups.backup("mallory"))
        # A store the user can write (Drive with her own token): she edits her latest manifest.
        manifest = engine.manifest()
        manifest.links = [LinkEntry("a/up", ".."), LinkEntry("chain", "a/up/../bob/x")]
        engine.store.put_bytes(snapshot_key(manifest.snapshot), manifest.to_bytes())
        shutil.rmtree(ws / "a")
        asyncio.run(backups.restore("mallory", None, None, "back"))
    finally:
        backups.close()

    assert os.readlink(ws / "back" / "a" / "up") == ".."
    assert not os.path.lexists(ws / "back" / "chain")
    assert (ws / "back" / "a" / "file.txt").read_text() == "mine"


def test_a_private_folder_and_a_name_that_is_not_utf8_come_back(arena: Arena, s3_server: S3Server) -> None:
    settings = settings_for(s3_server)
    backups = Backups(settings, arena.workspaces, arena.base / "cache")
    ws = arena.workspace("mallory")
    write(ws, ".ssh/id_ed25519", "PRIVATE KEY")
    (ws / ".ssh" / "id_ed25519").chmod(0o600)
    (ws / ".ssh").chmod(0o700)
    latin1 = os.fsdecode(b"r\xe9sum\xe9.txt")  # a name from an old Latin-1 archive
    write(ws, latin1, "not lost")
    own(ws, arena.uid)
    try:
        report = asyncio.run(backups.backup("mallory"))
        shutil.rmtree(ws / ".ssh")
        (ws / latin1).unlink()
        asyncio.run(backups.restore("mallory", None, None))
    finally:
        backups.close()

    assert report.skipped == []
    assert stat.S_IMODE((ws / ".ssh").stat().st_mode) == 0o700
    assert (ws / ".ssh").stat().st_uid == arena.uid
    assert b"r\xe9sum\xe9.txt" in os.listdir(os.fsencode(ws))
    assert (ws / latin1).read_text() == "not lost"


def test_a_manifest_cannot_smuggle_a_name_outside(arena: Arena, s3_server: S3Server) -> None:
    """Names that are not UTF-8 travel as escapes: an escape that would decode to '/' or NUL is refused."""
    settings = settings_for(s3_server)
    engine = SyncEngine(settings.store_for("mallory"))
    ws = arena.workspace("mallory")
    write(ws, "a.txt", "a")
    sid = engine.backup(ws).snapshot
    assert sid is not None
    manifest = engine.manifest(sid)
    text = gzip.decompress(manifest.to_bytes()).decode().replace('"a.txt"', '"\\udc2e\\udc2e\\udc2fescaped.txt"')
    engine.store.put_bytes(snapshot_key(sid), gzip.compress(text.encode()))
    with pytest.raises(StoreError, match="damaged"):
        Manifest.from_bytes(engine.store.get_bytes(snapshot_key(sid)))
    with pytest.raises(StoreError, match="damaged"):
        engine.restore(ws)
    assert not (arena.workspaces / "escaped.txt").exists()
