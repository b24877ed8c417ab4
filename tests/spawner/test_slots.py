"""Unit tests for dolab_spawner.slots: the slot allocator (GpuSlot and the inventory: tests/core/test_gpus.py)."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dolab_core.gpus import LOCAL_HOST, GpuSlot
from dolab_spawner.slots import NoFreeSlot, SlotAllocator

A100 = "NVIDIA A100-SXM4-80GB"
A10 = "NVIDIA A10"
H100 = "NVIDIA H100 80GB HBM3"


def _slot(index: int, name: str = A100, memory_gb: float = 80, host: str = LOCAL_HOST) -> GpuSlot:
    return GpuSlot(index=index, uuid=f"GPU-{host}-{index:04d}", name=name, memory_gb=memory_gb, host=host)


# ----- SlotAllocator ----------------------------------------------------------------------------------------


def _allocator() -> SlotAllocator:
    return SlotAllocator([_slot(0, A100), _slot(1, A100), _slot(2, A10), _slot(3, H100)])


def test_allocate_and_release() -> None:
    allocator = _allocator()
    assert allocator.availability() == (4, 4)
    got = allocator.allocate("alice/", 1, "A100")
    assert [s.index for s in got] == [0]
    assert allocator.held_by("alice/") == [got[0].key]
    assert allocator.holders() == {got[0].key: "alice/"}
    assert allocator.availability("A100") == (1, 2)
    assert allocator.availability() == (3, 4)
    assert allocator.release("alice/") == [got[0].key]
    assert allocator.availability("A100") == (2, 2)
    assert allocator.holders() == {}


def test_allocate_zero_takes_nothing() -> None:
    allocator = _allocator()
    assert allocator.allocate("alice/", 0) == []
    assert allocator.holders() == {}


def test_allocate_respects_gpu_type() -> None:
    allocator = _allocator()
    assert [s.index for s in allocator.allocate("a/", 1, "A10")] == [2]
    with pytest.raises(NoFreeSlot) as info:
        allocator.allocate("b/", 1, "A10")
    assert (info.value.wanted, info.value.gpu_type, info.value.free, info.value.total) == (1, "A10", 0, 1)
    assert str(info.value) == "wanted 1 A10 GPU(s), 0 of 1 free"


def test_allocate_unknown_type() -> None:
    with pytest.raises(NoFreeSlot) as info:
        _allocator().allocate("a/", 1, "V100")
    assert (info.value.free, info.value.total) == (0, 0)


def test_multi_gpu_allocation_is_all_or_none() -> None:
    allocator = _allocator()
    allocator.allocate("alice/", 1, "A100")
    before = allocator.holders()
    with pytest.raises(NoFreeSlot) as info:
        allocator.allocate("bob/", 2, "A100")
    assert (info.value.wanted, info.value.free, info.value.total) == (2, 1, 2)
    assert allocator.holders() == before
    assert allocator.held_by("bob/") == []
    with pytest.raises(NoFreeSlot, match="wanted 5 GPU"):
        allocator.allocate("bob/", 5)
    assert allocator.holders() == before
    got = allocator.allocate("bob/", 3)
    assert sorted(s.index for s in got) == [1, 2, 3]
    assert allocator.availability() == (0, 4)


def test_owner_reallocating_gets_its_own_slots_back() -> None:
    allocator = _allocator()
    first = allocator.allocate("alice/", 2)
    allocator.allocate("bob/", 1)
    again = allocator.allocate("alice/", 2)
    assert again == first
    assert sorted(allocator.held_by("alice/")) == sorted(s.key for s in first)
    assert allocator.availability() == (1, 4)


def test_owner_growing_keeps_its_slots_and_takes_more() -> None:
    allocator = _allocator()
    first = allocator.allocate("alice/", 1, "A100")
    again = allocator.allocate("alice/", 2, "A100")
    assert again[0] == first[0]
    assert sorted(allocator.held_by("alice/")) == sorted(s.key for s in again)


@pytest.mark.parametrize(
    ("first", "second"),
    [((2, "A100"), (1, "A100")), ((1, "A10"), (1, "H100"))],
    ids=["fewer", "other type"],
)
def test_reallocation_holds_exactly_what_it_returns(first: tuple[int, str], second: tuple[int, str]) -> None:
    allocator = _allocator()
    allocator.allocate("alice/", *first)
    again = allocator.allocate("alice/", *second)
    assert sorted(allocator.held_by("alice/")) == sorted(s.key for s in again)


def test_release_of_nothing() -> None:
    allocator = _allocator()
    allocator.allocate("alice/", 1)
    assert allocator.release("nobody/") == []
    assert allocator.release("alice/") != []
    assert allocator.release("alice/") == []


def test_claim_and_conflict() -> None:
    allocator = _allocator()
    a0, a1 = _slot(0).key, _slot(1).key
    assert allocator.claim("alice/", [a0]) == []
    assert allocator.claim("alice/", [a0]) == [], "claiming one's own slot again is fine"
    assert allocator.claim("bob/", [a0, a1]) == [a0]
    assert allocator.holders() == {a0: "alice/", a1: "bob/"}
    assert allocator.availability("A100") == (0, 2)


def test_claim_before_inventory_is_read() -> None:
    allocator = SlotAllocator()
    key = _slot(1).key
    assert allocator.claim("alice/", [key]) == []
    allocator.set_inventory([_slot(1), _slot(0)])
    assert [s.index for s in allocator.inventory] == [0, 1]
    assert allocator.availability() == (1, 2)
    assert [s.index for s in allocator.allocate("bob/", 1)] == [0]


def test_set_inventory_keeps_holders_of_vanished_gpus() -> None:
    allocator = _allocator()
    got = allocator.allocate("alice/", 1, "H100")
    allocator.set_inventory([_slot(0)])
    assert allocator.held_by("alice/") == [got[0].key]
    assert allocator.availability() == (1, 1)


def test_inventory_is_a_copy() -> None:
    allocator = _allocator()
    allocator.inventory.clear()
    assert len(allocator.inventory) == 4


def test_constructor_inventory_in_index_order() -> None:
    allocator = SlotAllocator([_slot(1), _slot(0)])
    assert [s.index for s in allocator.inventory] == [0, 1]
    assert [s.index for s in allocator.allocate("alice/", 1)] == [0]


# ----- a state machine: allocate, release and hub restarts --------------------------------------------------

MACHINE_INVENTORY = [
    _slot(0, A100),
    _slot(1, A100),
    _slot(2, A10),
    _slot(3, H100),
    _slot(0, A100, host="node-2"),
]
OWNERS = ["alice/", "bob/", "bob/big", "carol/", "dave/"]
GPU_TYPES = ["", "A100", "A10", "H100", "V100"]


class AllocatorMachine(RuleBasedStateMachine):
    """The allocator against a model of the spawner state: what each owner was given."""

    def __init__(self) -> None:
        super().__init__()
        self.allocator = SlotAllocator(MACHINE_INVENTORY)
        # owner -> (count, gpu_type, keys): the request and the slots recorded in the server's state.
        self.records: dict[str, tuple[int, str, list[str]]] = {}

    def _held_keys(self) -> set[str]:
        return {key for _, _, keys in self.records.values() for key in keys}

    @rule(owner=st.sampled_from(OWNERS), count=st.integers(0, 4), gpu_type=st.sampled_from(GPU_TYPES))
    def allocate(self, owner: str, count: int, gpu_type: str) -> None:
        if owner in self.records:
            return  # a new start of a running server is a retry; see retry()
        matching = [s for s in MACHINE_INVENTORY if s.matches(gpu_type)]
        free = [s for s in matching if s.key not in self._held_keys()]
        # A server's GPUs are all on one host: what counts is the most free GPUs on any one host.
        free_per_host = [sum(1 for s in free if s.host == host) for host in {s.host for s in matching}]
        most_free = max(free_per_host, default=0)
        try:
            got = self.allocator.allocate(owner, count, gpu_type)
        except NoFreeSlot as e:
            assert count > most_free
            assert (e.wanted, e.free, e.total) == (count, most_free, len(matching))
            assert self.allocator.held_by(owner) == []
            return
        assert count <= most_free
        assert len({s.host for s in got}) <= 1, "one server's GPUs must be on one host"
        assert len(got) == max(count, 0)
        assert len({s.key for s in got}) == len(got)
        assert all(s in free for s in got)
        assert sorted(self.allocator.held_by(owner)) == sorted(s.key for s in got)
        if got:
            self.records[owner] = (count, gpu_type, [s.key for s in got])

    @rule(owner=st.sampled_from(OWNERS))
    def retry(self, owner: str) -> None:
        if owner not in self.records:
            return
        count, gpu_type, keys = self.records[owner]
        got = self.allocator.allocate(owner, count, gpu_type)
        assert sorted(s.key for s in got) == sorted(keys)

    @rule(owner=st.sampled_from(OWNERS))
    def release(self, owner: str) -> None:
        released = self.allocator.release(owner)
        _, _, keys = self.records.pop(owner, (0, "", []))
        assert sorted(released) == sorted(keys)

    @rule(rnd=st.randoms(use_true_random=False))
    def rebuild(self, rnd: random.Random) -> None:
        """A hub restart: a fresh allocator, then every server's state re-claims its slots, in any order."""
        self.allocator = SlotAllocator(MACHINE_INVENTORY)
        owners = list(self.records)
        rnd.shuffle(owners)
        for owner in owners:
            assert self.allocator.claim(owner, self.records[owner][2]) == []

    @invariant()
    def table_matches_the_records(self) -> None:
        keys = [key for _, _, ks in self.records.values() for key in ks]
        assert len(keys) == len(set(keys)), "a GPU recorded for two owners"
        expected = {key: owner for owner, (_, _, ks) in self.records.items() for key in ks}
        assert self.allocator.holders() == expected
        for owner in OWNERS:
            assert sorted(self.allocator.held_by(owner)) == sorted(self.records.get(owner, (0, "", []))[2])

    @invariant()
    def free_plus_held_is_total(self) -> None:
        free, total = self.allocator.availability()
        assert total == len(MACHINE_INVENTORY)
        assert free + len(self.allocator.holders()) == total
        for gpu_type in GPU_TYPES:
            free, total = self.allocator.availability(gpu_type)
            held = sum(1 for s in MACHINE_INVENTORY if s.matches(gpu_type) and s.key in self._held_keys())
            assert free + held == total


AllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestAllocatorMachine = AllocatorMachine.TestCase


# ----- concurrency ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("starts", "gpus"), [(2, 4), (4, 4), (12, 4), (30, 3)], ids=["fewer", "equal", "more", "many"])
async def test_interleaved_starts_never_share_a_gpu(starts: int, gpus: int) -> None:
    allocator = SlotAllocator([_slot(i) for i in range(gpus)])
    rnd = random.Random(starts * 1000 + gpus)

    async def start(i: int) -> list[GpuSlot] | None:
        await asyncio.sleep(rnd.random() * 0.005)
        try:
            got = allocator.allocate(f"user{i}/", 1)
        except NoFreeSlot:
            return None
        await asyncio.sleep(rnd.random() * 0.005)  # the server starts while others allocate
        return got

    results = await asyncio.gather(*(start(i) for i in range(starts)))
    won = [r for r in results if r is not None]
    assert len(won) == min(starts, gpus)
    keys = [s.key for got in won for s in got]
    assert len(keys) == len(set(keys))
    assert allocator.availability() == (gpus - len(won), gpus)


async def test_interleaved_multi_gpu_starts() -> None:
    allocator = SlotAllocator([_slot(i) for i in range(5)])
    rnd = random.Random(7)

    async def start(i: int) -> list[GpuSlot] | None:
        await asyncio.sleep(rnd.random() * 0.005)
        try:
            return allocator.allocate(f"user{i}/", 2)
        except NoFreeSlot:
            return None

    results = await asyncio.gather(*(start(i) for i in range(10)))
    won = [r for r in results if r is not None]
    assert len(won) == 2
    keys = [s.key for got in won for s in got]
    assert len(keys) == len(set(keys)) == 4
    assert allocator.availability() == (1, 5)


def test_one_servers_gpus_are_on_one_engine() -> None:
    inventory = [
        GpuSlot(0, "GPU-a0", "A100", 80, host="a"),
        GpuSlot(0, "GPU-b0", "A100", 80, host="b"),
        GpuSlot(1, "GPU-b1", "A100", 80, host="b"),
    ]
    allocator = SlotAllocator(inventory)
    got = allocator.allocate("u/", 2, "A100")
    assert {s.host for s in got} == {"b"}
    with pytest.raises(NoFreeSlot) as info:
        allocator.allocate("v/", 2, "A100")
    assert (info.value.free, info.value.total) == (1, 3)
    assert [s.uuid for s in allocator.allocate("v/", 1, "A100", hosts=["a"])] == ["GPU-a0"]
    with pytest.raises(NoFreeSlot):
        allocator.allocate("w/", 1, "A100", hosts=["local"])
