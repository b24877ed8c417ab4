"""Unit tests for DoLabSpawner itself (dolab_spawner.spawner), without a running hub: its config check, and its state
(get_state, load_state, clear_state) through ServerState, as a restarted hub and the services read it.

The spawners here are real, built from a traitlets Config as the hub builds them, with the hub's own database
objects (an in-memory JupyterHub database) for the server the hub lists; the user is only the name the spawner reads.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from jupyterhub import orm
from sqlalchemy.orm import Session
from traitlets import TraitError
from traitlets.config import Config

from dolab_core.gpus import GpuSlot
from dolab_core.serverstate import STATE_VERSION, ServerState
from dolab_spawner import DoLabSpawner
from dolab_spawner.reservations import SlotPool
from dolab_spawner.slots import NoFreeSlot, SlotAllocator
from tests.spawner.test_form import GPU_INVENTORY, PROFILE_LIST

# ----- config check -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "phrase"),
    [
        ({"profile_list": [{"slug": "cpu"}]}, "DoLabSpawner.profile_list: profile_list[0]: display_name must be"),
        ({"profile_list": [{"display_name": "x", "gpus": "2"}]}, "DoLabSpawner.profile_list: profile 'x': gpus must"),
        (
            {"profile_list": [{"display_name": "x", "spawner_override": {"mem_limitt": "1G"}}]},
            "spawner_override sets mem_limitt, which the spawner does not have",
        ),
        ({"profile_list": "cpu"}, "The 'profile_list' trait of a DoLabSpawner instance expected a list or a callable"),
        ({"gpu_inventory": [{"index": 0, "name": "x"}]}, "DoLabSpawner.gpu_inventory: GPU entry"),
        (
            {"gpu_inventory": [*GPU_INVENTORY, GPU_INVENTORY[0]]},
            "DoLabSpawner.gpu_inventory: gpu_inventory lists the same GPU twice: local/GPU-0000",
        ),
        ({"gpu_inventory": [{"index": -1, "uuid": "GPU-0", "name": "x"}]}, "index must be a non-negative integer"),
    ],
    ids=[
        "no display_name",
        "gpus str",
        "unknown override",
        "not a list",
        "gpu missing uuid",
        "duplicate gpu",
        "negative index",
    ],
)
def test_bad_config_is_a_trait_error(section: dict[str, Any], phrase: str) -> None:
    config = Config()
    for name, value in section.items():
        config.DoLabSpawner[name] = value
    with pytest.raises(TraitError) as info:
        DoLabSpawner.check_config(config)
    assert phrase in str(info.value)
    with pytest.raises(TraitError):
        DoLabSpawner(config=config)


def test_good_config_passes_the_check() -> None:
    config = Config()
    cpu = {**PROFILE_LIST[0], "spawner_override": {"mem_limit": "2G", "python_env": "/opt/env"}}
    config.DoLabSpawner.profile_list = [cpu, *PROFILE_LIST[1:]]
    config.DoLabSpawner.gpu_inventory = GPU_INVENTORY
    DoLabSpawner.check_config(config)


def test_callable_profile_list_is_not_checked_at_start_up() -> None:
    config = Config()
    config.DoLabSpawner.profile_list = lambda spawner: [{"slug": "no display name"}]
    DoLabSpawner.check_config(config)


@pytest.mark.parametrize(
    "value",
    [{"index": 0, "uuid": "GPU-0", "name": "x"}, 5, "GPU-0"],
    ids=["one dict", "a number", "a string"],
)
def test_gpu_inventory_not_a_list(value: Any) -> None:
    config = Config()
    config.DoLabSpawner.gpu_inventory = value
    with pytest.raises(TraitError, match=r"gpu_inventory.* list"):
        DoLabSpawner.check_config(config)


def test_bad_docker_hosts_is_a_config_error() -> None:
    config = Config()
    config.DoLabSpawner.docker_hosts = [{"name": "x", "url": "ftp://nope"}]
    with pytest.raises(TraitError, match=r"DoLabSpawner\.docker_hosts: docker_hosts\[0\]: url must start"):
        DoLabSpawner.check_config(config)


# ----- state: what a restarted hub and every service read -------------------------------------------------------

SLOTS = [
    {"index": 0, "uuid": "GPU-aaaa", "name": "NVIDIA A100 80GB PCIe", "memory_gb": 80.0, "host": "local"},
    {"index": 1, "uuid": "GPU-bbbb", "name": "NVIDIA A100 80GB PCIe", "memory_gb": 80.0, "host": "local"},
]
STOP_AT = "2030-01-31T18:00:00Z"


@pytest.fixture(autouse=True)
def slot_table() -> Iterator[SlotAllocator]:
    """A hub-wide slot table of its own for every test (the class-level one is put back after), with two GPUs."""
    saved = DoLabSpawner._pool
    DoLabSpawner._pool = SlotPool()
    DoLabSpawner._pool.allocator.set_inventory(GpuSlot.from_dict(s) for s in SLOTS)
    DoLabSpawner._pool.loaded = True
    try:
        yield DoLabSpawner._pool.allocator
    finally:
        DoLabSpawner._pool = saved


@pytest.fixture
def hub_db() -> Iterator[Session]:
    """The hub's database (in memory), where the hub lists users' servers."""
    session = orm.new_session_factory("sqlite://")()
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def server_process() -> Iterator[subprocess.Popen[bytes]]:
    """A process standing for a local server that outlives a hub restart (never stopped by the spawner here)."""
    process = subprocess.Popen(["sleep", "300"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def spawner_of(db: Session, user: str, running: bool = True, **traits: Any) -> DoLabSpawner:
    """A DoLabSpawner for ``user``'s default server as the hub builds it; ``running``: the hub lists its server."""
    orm_user = db.query(orm.User).filter_by(name=user).one_or_none() or orm.User(name=user)
    db.add(orm_user)
    orm_spawner = orm.Spawner(user=orm_user, name="")
    if running:
        orm_spawner.server = orm.Server(ip="127.0.0.1", port=51234, base_url=f"/user/{user}/")
    db.add(orm_spawner)
    db.commit()
    config = Config()
    config.DoLabSpawner.workspace_root = "/srv/dolab/workspaces"
    for name, value in traits.items():
        config.DoLabSpawner[name] = value
    return DoLabSpawner(config=config, user=SimpleNamespace(name=user), orm_spawner=orm_spawner)


def local_state(pid: int) -> dict[str, Any]:
    """The state of a local server on both GPUs with a stop time, as this release writes it."""
    return ServerState(
        profile="a100x2",
        backend="local",
        host="local",
        slots=tuple(SLOTS),
        stop_at=STOP_AT,
        backend_state={"pid": pid} if pid else {},
    ).to_dict()


def test_a_state_written_by_get_state_reads_back_into_the_same_server(
    hub_db: Session, slot_table: SlotAllocator, server_process: subprocess.Popen[bytes]
) -> None:
    before = spawner_of(hub_db, "ana")
    before.load_state(local_state(server_process.pid))
    written = before.get_state()
    saved = ServerState.read(written)
    assert (saved.profile, saved.backend, saved.host, [dict(s) for s in saved.slots], saved.stop_at) == (
        "a100x2",
        "local",
        "local",
        SLOTS,
        STOP_AT,
    )
    assert saved.backend_state == {"pid": server_process.pid}
    assert saved.workspace == "/srv/dolab/workspaces/ana", "the sync service backs this folder up"
    assert saved.server_url == "http://127.0.0.1:51234/user/ana/", "services read the server directly"
    assert saved.version == STATE_VERSION

    # A restarted hub: a new slot table, the same database.
    DoLabSpawner._pool = SlotPool()
    DoLabSpawner._pool.allocator.set_inventory(GpuSlot.from_dict(s) for s in SLOTS)
    after = spawner_of(hub_db, "ana")
    after.load_state(written)
    assert (after.profile_slug, after.backend_name, after.host_name, after.slot_dicts, after.stop_at) == (
        "a100x2",
        "local",
        "local",
        SLOTS,
        STOP_AT,
    )
    assert after.stop_at_datetime == datetime(2030, 1, 31, 18, tzinfo=timezone.utc)
    assert after.host_workspace() == "/srv/dolab/workspaces/ana"
    assert ServerState.read(after.get_state()) == saved
    assert sorted(DoLabSpawner._pool.allocator.held_by("ana/")) == ["local/GPU-aaaa", "local/GPU-bbbb"]
    with pytest.raises(NoFreeSlot):
        DoLabSpawner._pool.allocator.allocate("bob/", 1, "A100")


def test_a_wave_1_state_without_a_version_loads(hub_db: Session, slot_table: SlotAllocator) -> None:
    wave_1 = {
        "profile": "a100",
        "backend": "local",
        "host": "local",
        "slots": [SLOTS[1]],
        "stop_at": STOP_AT,
        "backend_state": {},
    }
    spawner = spawner_of(hub_db, "ana")
    spawner.load_state(wave_1)
    assert (spawner.profile_slug, spawner.backend_name, spawner.slot_dicts, spawner.stop_at) == (
        "a100",
        "local",
        [SLOTS[1]],
        STOP_AT,
    )
    assert slot_table.held_by("ana/") == ["local/GPU-bbbb"]
    state = spawner.get_state()
    assert state["version"] == STATE_VERSION, "written back as this release's version"
    assert {key: state[key] for key in wave_1} == wave_1


def test_the_state_of_a_server_the_hub_no_longer_lists_claims_no_gpu(
    hub_db: Session, slot_table: SlotAllocator
) -> None:
    spawner = spawner_of(hub_db, "ana", running=False)
    spawner.load_state(local_state(0))
    assert spawner.slot_dicts == SLOTS
    assert slot_table.held_by("ana/") == []


def test_clear_state_frees_the_slots(hub_db: Session, slot_table: SlotAllocator) -> None:
    spawner = spawner_of(hub_db, "ana")
    spawner.load_state(local_state(0))
    assert len(slot_table.held_by("ana/")) == 2
    with pytest.raises(NoFreeSlot):
        slot_table.allocate("bob/", 1, "A100")
    spawner.clear_state()
    assert slot_table.held_by("ana/") == []
    assert [s.uuid for s in slot_table.allocate("bob/", 2, "A100")] == ["GPU-aaaa", "GPU-bbbb"]
    assert (spawner.profile_slug, spawner.backend_name, spawner.host_name, spawner.slot_dicts, spawner.stop_at) == (
        "",
        "",
        "",
        [],
        "",
    )
    assert spawner.get_state() == {}, "a stopped server leaves no state behind"


async def test_why_a_stop_kept_the_storage_survives_the_stop_and_a_restart(
    hub_db: Session, slot_table: SlotAllocator
) -> None:
    def failing_backup(spawner: DoLabSpawner, reason: str) -> None:
        raise RuntimeError("The final backup failed: the store is unreachable.")

    spawner = spawner_of(hub_db, "ana", pre_destroy_hooks=[failing_backup])
    spawner.load_state(local_state(0))
    await spawner.stop()
    assert slot_table.held_by("ana/") == [], "a kept server holds no GPU"
    spawner.clear_state()  # what the hub does after a stop
    state = spawner.get_state()
    assert state["kept"]["reason"] == "The final backup failed: the store is unreachable."
    assert ServerState.read(state).kept_at == spawner.kept_at != ""

    restarted = spawner_of(hub_db, "ana", running=False)
    restarted.load_state(state)
    assert (restarted.kept_reason, restarted.kept_at) == (spawner.kept_reason, spawner.kept_at)
    assert ServerState.read(restarted.get_state()).kept_reason == spawner.kept_reason
