"""How the sync service shares its pool among users (dolab_services/sync/backups.py): one operation per user at a
time, for as long as its thread works (even past the timeout), a bounded number waiting, a queued one that timed
out never started. The work here is a function that waits for the test's signal: a long restore, as seen from the
scheduler; the store is moto_server's, as the service's would be."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from dolab_services.sync.backups import MAX_WAITING_PER_USER, Backups, Overdue, TooManyWaiting
from dolab_services.sync.config import SyncSettings
from dolab_services.sync.engine import SyncEngine

from .conftest import CREDENTIALS, S3Server


def backups_for(s3_server: S3Server, tmp_path: Path, *, concurrency: int, timeout_seconds: float) -> Backups:
    settings = SyncSettings(
        bucket=s3_server.new_bucket(),
        endpoint_url=s3_server.endpoint_url,
        region=CREDENTIALS["region_name"],
        access_key_id=CREDENTIALS["access_key_id"],
        secret_access_key=CREDENTIALS["secret_access_key"],
    )
    return Backups(
        settings, tmp_path / "ws", tmp_path / "cache", concurrency=concurrency, timeout_seconds=timeout_seconds
    )


class Work:
    """A piece of work for the pool that records when it ran, and (``hold``) waits for :meth:`finish` first."""

    def __init__(self, name: str, log: list[str], hold: bool = False) -> None:
        self.name = name
        self.log = log
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, engine: SyncEngine) -> str:
        self.log.append(f"{self.name} starts")
        self.started.set()
        assert self.release.wait(60), f"{self.name} was never released"
        self.log.append(f"{self.name} ends")
        return self.name

    def finish(self) -> None:
        self.release.set()


async def started(work: Work, timeout: float = 30) -> None:
    """Wait, off the loop, until ``work`` runs on the pool."""
    assert await asyncio.to_thread(work.started.wait, timeout), f"{work.name} never started"


def test_a_users_turn_lasts_as_long_as_her_work_even_past_the_timeout(s3_server: S3Server, tmp_path: Path) -> None:
    backups = backups_for(s3_server, tmp_path, concurrency=2, timeout_seconds=3)
    log: list[str] = []
    long = Work("mallory-long", log, hold=True)
    next_one, bobs = Work("mallory-next", log), Work("bob", log)

    async def scenario() -> None:
        with pytest.raises(Overdue, match="It goes on"):
            await backups._run("mallory", long)
        queued = asyncio.create_task(backups._run("mallory", next_one))
        # Bob gets the pool's other thread at once: her overdue work holds one thread, her next one none.
        assert await asyncio.wait_for(backups._run("bob", bobs), 10) == "bob"
        await asyncio.sleep(0.3)
        assert not next_one.started.is_set(), "her next operation ran beside her overdue one"
        long.finish()
        assert await asyncio.wait_for(queued, 10) == "mallory-next"

    try:
        asyncio.run(scenario())
    finally:
        backups.close()
    assert log.index("mallory-long ends") < log.index("mallory-next starts")
    assert log.index("bob ends") < log.index("mallory-long ends")


def test_a_user_can_queue_only_a_few_operations(s3_server: S3Server, tmp_path: Path) -> None:
    backups = backups_for(s3_server, tmp_path, concurrency=2, timeout_seconds=60)
    log: list[str] = []
    running = Work("running", log, hold=True)

    async def scenario() -> None:
        first = asyncio.create_task(backups._run("mallory", running))
        await started(running)
        waiting = [
            asyncio.create_task(backups._run("mallory", Work(f"w{i}", log))) for i in range(MAX_WAITING_PER_USER)
        ]
        await asyncio.sleep(0.1)  # let them all reach the queue
        started_at = time.monotonic()
        with pytest.raises(TooManyWaiting, match="waiting already") as refused:
            await backups._run("mallory", Work("one too many", log))
        assert time.monotonic() - started_at < 1  # refused at once, not after a wait
        assert refused.value.status == 429
        assert await asyncio.wait_for(backups._run("bob", Work("bob", log)), 10) == "bob"  # others are not refused
        running.finish()
        assert await asyncio.wait_for(asyncio.gather(first, *waiting), 30) == [
            "running",
            *(f"w{i}" for i in range(MAX_WAITING_PER_USER)),
        ]

    try:
        asyncio.run(scenario())
    finally:
        backups.close()
    assert "one too many starts" not in log


def test_an_operation_that_never_got_a_thread_is_dropped_at_the_timeout(s3_server: S3Server, tmp_path: Path) -> None:
    backups = backups_for(s3_server, tmp_path, concurrency=1, timeout_seconds=3)
    log: list[str] = []
    bobs = Work("bob-long", log, hold=True)
    queued = Work("mallory-queued", log)

    async def scenario() -> None:
        bob = asyncio.create_task(backups._run("bob", bobs))
        await started(bobs)
        with pytest.raises(Overdue, match="had no room"):
            await backups._run("mallory", queued)
        bobs.finish()
        with pytest.raises(Overdue):
            await bob  # past the timeout too; it went on to its end
        # Her turn was given back: her next operation runs.
        assert await asyncio.wait_for(backups._run("mallory", Work("mallory-next", log)), 10) == "mallory-next"

    try:
        asyncio.run(scenario())
    finally:
        backups.close()
    assert "mallory-queued starts" not in log
