"""The GPU slots a DoLabSpawner's server holds: the hub-wide inventory (read once, shared by every spawner), taking
slots for a start with a sentence when there are none, giving them back, and claiming them again from the state of
a server that survived a hub restart. A DoLabSpawner mixin.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, ClassVar

from jupyterhub.spawner import Spawner, SpawnException
from traitlets import TraitError, validate

from dolab_core.gpus import GpuSlot, inventory_from_config, load_inventory

from .backends.docker_hosts import remote_slots
from .options import Selection
from .profiles import Profile
from .slots import NoFreeSlot, SlotAllocator

__all__ = ["GpuReservations", "SlotPool", "no_slot_sentence"]

if TYPE_CHECKING:
    _Base = Spawner
else:
    _Base = object


class SlotPool:
    """The hub-wide GPU table every DoLabSpawner shares (one hub per process)."""

    #: After NVML timed out, how long to treat the host as GPU-less before asking again.
    retry_seconds = 300.0

    def __init__(self) -> None:
        self.allocator = SlotAllocator()
        self.loaded = False
        self.lock: asyncio.Lock | None = None
        self.retry_at = 0.0


def no_slot_sentence(profile: Profile, error: NoFreeSlot) -> str:
    """What to tell a user whose profile's GPUs cannot be taken now, and what to do about it."""
    kind = f"{profile.gpu_type} " if profile.gpu_type else ""
    if error.total == 0:
        return (
            f"There is no {kind}GPU for the profile {profile.display_name!r} here. "
            "Pick another profile or ask an administrator."
        )
    if error.wanted > error.total:
        return (
            f"There are only {error.total} {kind}GPU(s) here; the profile {profile.display_name!r} "
            f"asks for {error.wanted}. Ask for fewer GPUs or pick another profile."
        )
    if error.free == 0:
        return f"All {error.total} {kind}GPU(s) are in use. Pick a CPU profile or try again when a GPU is free."
    return (
        f"Only {error.free} of {error.total} {kind}GPU(s) are free together on one machine; you asked for "
        f"{error.wanted}. Ask for fewer GPUs or try again when more are free."
    )


class GpuReservations(_Base):  # type: ignore[valid-type,misc]
    """DoLabSpawner's GPU slots: :meth:`ensure_inventory`, and taking, releasing and re-claiming its server's."""

    _pool: ClassVar[SlotPool] = SlotPool()

    if TYPE_CHECKING:
        gpu_inventory: Any
        gpu_ids: list[int | str]
        nvml_timeout_seconds: float
        docker_hosts: list[dict[str, Any]]

        def backend_hosts(self, backend: str) -> list[str]: ...

        def _refuse(self, message: str, reason: str, status_code: int) -> SpawnException: ...

    @validate("gpu_inventory")
    def _validate_gpu_inventory(self, proposal: dict) -> Any:
        value = proposal["value"]
        if value is not None:
            if not isinstance(value, (list, tuple)):
                raise TraitError(
                    "DoLabSpawner.gpu_inventory must be a list of dicts with index, uuid, name and memory_gb, "
                    f"not {type(value).__name__}"
                )
            try:
                inventory_from_config(value)
            except (ValueError, TypeError) as e:
                raise TraitError(f"DoLabSpawner.gpu_inventory: {e}") from None
        return value

    @property
    def allocator(self) -> SlotAllocator:
        """The hub-wide slot table."""
        return self._pool.allocator

    @property
    def owner(self) -> str:
        """Who holds this server's slots in the allocator."""
        return f"{self.user.name}/{self.name}"

    async def ensure_inventory(self) -> list[GpuSlot]:
        """Read the GPUs once per hub process (NVML off the event loop), shared by every spawner."""
        pool = self._pool
        if not pool.loaded and time.monotonic() >= pool.retry_at:
            if pool.lock is None:
                pool.lock = asyncio.Lock()
            async with pool.lock:
                if not pool.loaded and time.monotonic() >= pool.retry_at:
                    inventory = await load_inventory(self.gpu_inventory, self.gpu_ids, self.nvml_timeout_seconds)
                    if inventory is None:
                        pool.retry_at = time.monotonic() + pool.retry_seconds
                        return pool.allocator.inventory
                    pool.allocator.set_inventory([*inventory, *remote_slots(self.docker_hosts)])
                    pool.loaded = True
                    listed = ", ".join(f"{s.host}/{s.index}: {s.name}" for s in pool.allocator.inventory)
                    self.log.info("GPU inventory: %s", listed or "none")
        return pool.allocator.inventory

    def _allocate(self, selection: Selection) -> list[GpuSlot]:
        """Take the GPUs (synchronously: no await between check and take) or refuse with a sentence."""
        profile = selection.profile
        try:
            slots = self.allocator.allocate(
                self.owner, selection.gpus, profile.gpu_type, profile.gpu_exact, self.backend_hosts(profile.backend)
            )
        except NoFreeSlot as e:
            raise self._refuse(no_slot_sentence(profile, e), reason="no_gpu", status_code=409) from None
        self.log.info("Slot(s) allocated to %s: %s", self.owner, ", ".join(f"GPU {s.index} ({s.name})" for s in slots))
        return slots

    def _release(self, why: str) -> None:
        released = self.allocator.release(self.owner)
        if released:
            self.log.info("Slot(s) released by %s (%s): %s", self.owner, why, ", ".join(released))

    def _reclaim(self, slot_dicts: list[dict[str, Any]]) -> None:
        """Hold again the slots a running server's state lists (after a hub restart); a conflict is logged."""
        keys = [GpuSlot.from_dict(s).key for s in slot_dicts]
        conflicts = self.allocator.claim(self.owner, keys)
        if conflicts:
            self.log.error("%s's state claims GPU(s) another server holds: %s", self.owner, conflicts)
        else:
            self.log.info("Slot(s) re-claimed by %s from its state: %s", self.owner, ", ".join(keys))
