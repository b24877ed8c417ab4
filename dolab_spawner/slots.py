"""The slot allocator (the slots themselves and the GPU inventory are :mod:`dolab_core.gpus`).

A *slot* is one GPU of one host that at most one server holds at a time. The hub database is the source of
truth: every server's spawner state records the slots it holds, and :meth:`SlotAllocator.claim` rebuilds the
table from that state after a hub restart. Allocation is synchronous, so within the hub's single event loop no
other coroutine can run between the check for a free GPU and the take.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from dolab_core.gpus import GpuSlot

__all__ = ["NoFreeSlot", "SlotAllocator"]


class NoFreeSlot(Exception):
    """Raised when a request for GPUs cannot be met; carries the numbers for a user-facing sentence."""

    def __init__(self, wanted: int, gpu_type: str, free: int, total: int):
        self.wanted = wanted
        self.gpu_type = gpu_type
        self.free = free
        self.total = total
        kind = f"{gpu_type} " if gpu_type else ""
        super().__init__(f"wanted {wanted} {kind}GPU(s), {free} of {total} free")


class SlotAllocator:
    """Who holds which GPU.

    ``holders`` maps a slot key to its owner (``"user/server"``). It does not depend on the inventory, so a
    restarted hub can re-claim slots from spawner state before the inventory has been read.
    """

    def __init__(self, inventory: Iterable[GpuSlot] = ()):
        self._inventory: list[GpuSlot] = []
        self._holders: dict[str, str] = {}
        self.set_inventory(inventory)

    @property
    def inventory(self) -> list[GpuSlot]:
        """Every GPU that may be handed out, in index order."""
        return list(self._inventory)

    def set_inventory(self, inventory: Iterable[GpuSlot]) -> None:
        """Replace the inventory; existing holders are kept (a held GPU that vanished stays reserved)."""
        self._inventory = sorted(inventory, key=lambda s: (s.host, s.index))

    def holders(self) -> dict[str, str]:
        """A copy of the table: slot key -> owner."""
        return dict(self._holders)

    def held_by(self, owner: str) -> list[str]:
        """The slot keys one owner holds."""
        return [key for key, who in self._holders.items() if who == owner]

    def _matching(self, gpu_type: str, exact: bool, hosts: Collection[str] | None) -> list[GpuSlot]:
        return [s for s in self._inventory if s.matches(gpu_type, exact) and (hosts is None or s.host in hosts)]

    def availability(
        self, gpu_type: str = "", exact: bool = False, hosts: Collection[str] | None = None
    ) -> tuple[int, int]:
        """``(free, total)`` GPUs of the inventory that match ``gpu_type`` (on ``hosts``, if given)."""
        matching = self._matching(gpu_type, exact, hosts)
        free = sum(1 for s in matching if s.key not in self._holders)
        return free, len(matching)

    def allocate(
        self,
        owner: str,
        count: int,
        gpu_type: str = "",
        exact: bool = False,
        hosts: Collection[str] | None = None,
    ) -> list[GpuSlot]:
        """Take ``count`` free GPUs matching ``gpu_type`` for ``owner``, all or none, all on one host.

        Synchronous on purpose: no ``await`` can come between the check and the take. An owner that already
        holds slots gets the matching ones back first (a retried start must not take a second set); after a
        success the owner holds exactly what was returned. ``hosts`` limits where (a backend's machines);
        hosts are tried in inventory order. On failure, ``free`` is the most free GPUs on any one host.
        """
        matching = self._matching(gpu_type, exact, hosts)
        by_host: dict[str, list[GpuSlot]] = {}
        for slot in matching:
            by_host.setdefault(slot.host, []).append(slot)
        chosen: list[GpuSlot] = []
        most_free = 0
        # The owner's own host first, so a retried start finds the GPUs it already holds.
        for host_slots in sorted(
            by_host.values(), key=lambda ss: not any(self._holders.get(s.key) == owner for s in ss)
        ):
            mine = [s for s in host_slots if self._holders.get(s.key) == owner]
            free = [s for s in host_slots if s.key not in self._holders]
            most_free = max(most_free, len(free))
            if len(mine) + len(free) >= count:
                chosen = (mine + free)[: max(count, 0)]
                break
        else:
            if count > 0:
                raise NoFreeSlot(count, gpu_type, most_free, len(matching))
        self.release(owner)
        for slot in chosen:
            self._holders[slot.key] = owner
        return chosen

    def release(self, owner: str) -> list[str]:
        """Free every slot ``owner`` holds; returns their keys. Releasing nothing is fine."""
        keys = self.held_by(owner)
        for key in keys:
            del self._holders[key]
        return keys

    def claim(self, owner: str, keys: Iterable[str]) -> list[str]:
        """Re-take slots recorded in ``owner``'s state (hub restart). Returns keys another owner holds."""
        conflicts = []
        for key in keys:
            current = self._holders.get(key)
            if current is None or current == owner:
                self._holders[key] = owner
            else:
                conflicts.append(key)
        return conflicts
