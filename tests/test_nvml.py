"""Reading GPUs through NVML, with a stand-in pynvml module (no GPU on these machines).

The stand-in mirrors nvidia-ml-py's names and error type; the real library is exercised by bench/gpu_check.py
on a GPU machine.
"""

from __future__ import annotations

import asyncio
import sys
import time
import types
from typing import Any

import pytest

from dolab_core import gpus as slots
from dolab_core.gpus import GpuSlot, load_inventory, read_nvml_inventory


class NVMLError(Exception):
    pass


def fake_pynvml(devices: list[dict[str, Any]], count_error: bool = False) -> types.ModuleType:
    """A pynvml with ``devices``: dicts of name, uuid, memory_gb, and optionally mig (a list of such dicts)
    or broken (every call on it fails)."""
    module = types.ModuleType("pynvml")
    module.NVMLError = NVMLError  # type: ignore[attr-defined]
    module.NVML_DEVICE_MIG_ENABLE = 1  # type: ignore[attr-defined]
    calls: list[str] = []
    module.calls = calls  # type: ignore[attr-defined]

    def handle_of(index: int) -> dict[str, Any]:
        device = devices[index]
        if device.get("broken"):
            raise NVMLError("GPU is lost")
        return device

    def count() -> int:
        if count_error:
            raise NVMLError("driver not loaded")
        return len(devices)

    def mig_mode(handle: dict[str, Any]) -> tuple[int, int]:
        if "mig" not in handle:
            raise NVMLError("not supported")
        return (1, 1) if handle["mig"] else (0, 0)

    def mig_handle(handle: dict[str, Any], i: int) -> dict[str, Any]:
        if i >= len(handle["mig"]) or handle["mig"][i] is None:
            raise NVMLError("not found")
        return handle["mig"][i]

    module.nvmlInit = lambda: calls.append("init")  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = count  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = handle_of  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda h: h["name"].encode()  # type: ignore[attr-defined]  # old versions: bytes
    module.nvmlDeviceGetUUID = lambda h: h["uuid"]  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h["memory_gb"] * 2**30)  # type: ignore[attr-defined]
    module.nvmlDeviceGetMigMode = mig_mode  # type: ignore[attr-defined]
    module.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7  # type: ignore[attr-defined]
    module.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle  # type: ignore[attr-defined]
    return module


A100 = {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-a", "memory_gb": 80}
H100 = {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-h", "memory_gb": 79.6, "mig": []}
MIG_A100 = {
    "name": "NVIDIA A100-SXM4-40GB",
    "uuid": "GPU-m",
    "memory_gb": 40,
    "mig": [
        {"name": "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "uuid": "MIG-1", "memory_gb": 20},
        None,
        {"name": "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "uuid": "MIG-2", "memory_gb": 5},
    ],
}


def read_with(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType) -> list[GpuSlot]:
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return read_nvml_inventory()


def test_reads_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    module = fake_pynvml([A100, H100])
    assert read_with(monkeypatch, module) == [
        GpuSlot(index=0, uuid="GPU-a", name="NVIDIA A100-SXM4-80GB", memory_gb=80.0),
        GpuSlot(index=1, uuid="GPU-h", name="NVIDIA H100 80GB HBM3", memory_gb=79.6),
    ]
    assert module.calls == ["init", "shutdown"]


def test_mig_instances_are_the_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    found = read_with(monkeypatch, fake_pynvml([MIG_A100, A100]))
    assert [(s.index, s.uuid) for s in found] == [(0, "MIG-1"), (0, "MIG-2"), (1, "GPU-a")]
    assert found[1].matches("1g.5gb") and not found[0].matches("1g.5gb")


def test_a_broken_gpu_does_not_hide_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    found = read_with(monkeypatch, fake_pynvml([A100, {"broken": True}, H100]))
    assert [s.uuid for s in found] == ["GPU-a", "GPU-h"]


def test_count_failure_means_no_gpus_and_nvml_is_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    module = fake_pynvml([A100], count_error=True)
    assert read_with(monkeypatch, module) == []
    assert module.calls == ["init", "shutdown"]


async def test_a_hung_nvml_is_reported_as_unknown_not_as_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots, "_read_nvml_locked", lambda: time.sleep(0.5) or [])
    assert await load_inventory(None, timeout_seconds=0.05) is None
    await asyncio.sleep(0.5)  # let the stuck call end before the next test uses the pool


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
