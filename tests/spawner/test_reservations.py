"""Unit tests for dolab_spawner.reservations: the hub-wide GPU slot table and its inventory."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dolab_core.gpus import GpuSlot


async def test_spawner_asks_nvml_again_after_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    from dolab_spawner import reservations
    from dolab_spawner.reservations import SlotPool
    from dolab_spawner.spawner import DoLabSpawner

    answers: list[list[GpuSlot] | None] = [None, [GpuSlot(0, "GPU-a", "A100", 80)]]

    async def fake_load(*args: Any) -> list[GpuSlot] | None:
        return answers.pop(0)

    monkeypatch.setattr(reservations, "load_inventory", fake_load)
    monkeypatch.setattr(DoLabSpawner, "_pool", SlotPool())
    DoLabSpawner._pool.retry_seconds = 0.05
    spawner = DoLabSpawner()
    assert await spawner.ensure_inventory() == []
    assert await spawner.ensure_inventory() == [], "no new NVML call before retry_seconds"
    await asyncio.sleep(0.06)
    assert [s.uuid for s in await spawner.ensure_inventory()] == ["GPU-a"]
    assert answers == []
