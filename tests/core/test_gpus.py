"""dolab_core.gpus: GpuSlot, the configured inventory, and reading GPUs through NVML with a stand-in pynvml module
(no GPU on these machines).

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
from dolab_core.gpus import GpuSlot, inventory_from_config, load_inventory, read_nvml_inventory


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


A100_DEVICE = {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-a", "memory_gb": 80}
H100_DEVICE = {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-h", "memory_gb": 79.6, "mig": []}
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
    module = fake_pynvml([A100_DEVICE, H100_DEVICE])
    assert read_with(monkeypatch, module) == [
        GpuSlot(index=0, uuid="GPU-a", name="NVIDIA A100-SXM4-80GB", memory_gb=80.0),
        GpuSlot(index=1, uuid="GPU-h", name="NVIDIA H100 80GB HBM3", memory_gb=79.6),
    ]
    assert module.calls == ["init", "shutdown"]


def test_mig_instances_are_the_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    found = read_with(monkeypatch, fake_pynvml([MIG_A100, A100_DEVICE]))
    assert [(s.index, s.uuid) for s in found] == [(0, "MIG-1"), (0, "MIG-2"), (1, "GPU-a")]
    assert found[1].matches("1g.5gb") and not found[0].matches("1g.5gb")


def test_a_broken_gpu_does_not_hide_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    found = read_with(monkeypatch, fake_pynvml([A100_DEVICE, {"broken": True}, H100_DEVICE]))
    assert [s.uuid for s in found] == ["GPU-a", "GPU-h"]


def test_count_failure_means_no_gpus_and_nvml_is_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    module = fake_pynvml([A100_DEVICE], count_error=True)
    assert read_with(monkeypatch, module) == []
    assert module.calls == ["init", "shutdown"]


async def test_a_hung_nvml_is_reported_as_unknown_not_as_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots, "_read_nvml_locked", lambda: time.sleep(0.5) or [])
    assert await load_inventory(None, timeout_seconds=0.05) is None
    await asyncio.sleep(0.5)  # let the stuck call end before the next test uses the pool


# ----- GpuSlot ----------------------------------------------------------------------------------------------

A100 = "NVIDIA A100-SXM4-80GB"
H100 = "NVIDIA H100 80GB HBM3"

GOOD_SLOT_DICTS = [
    pytest.param(
        {"index": 0, "uuid": "GPU-1", "name": A100, "memory_gb": 80},
        GpuSlot(index=0, uuid="GPU-1", name=A100, memory_gb=80.0),
        id="full entry",
    ),
    pytest.param(
        {"index": 3, "uuid": "GPU-3", "name": "Fake"},
        GpuSlot(index=3, uuid="GPU-3", name="Fake", memory_gb=0.0),
        id="memory_gb defaults to 0",
    ),
    pytest.param(
        {"index": 1, "uuid": "GPU-2", "name": "Fake", "memory_gb": 23.5, "host": "node-2"},
        GpuSlot(index=1, uuid="GPU-2", name="Fake", memory_gb=23.5, host="node-2"),
        id="float memory and a host",
    ),
]


@pytest.mark.parametrize(("data", "expected"), GOOD_SLOT_DICTS)
def test_from_dict_good(data: dict[str, Any], expected: GpuSlot) -> None:
    slot = GpuSlot.from_dict(data)
    assert slot == expected
    assert isinstance(slot.memory_gb, float)
    assert GpuSlot.from_dict(slot.to_dict()) == slot
    assert slot.key == f"{expected.host}/{expected.uuid}"


BAD_SLOT_DICTS = [
    pytest.param("GPU-1", "a GPU entry must be a dict with index, uuid, name and memory_gb", id="not a dict"),
    pytest.param({"index": 0}, "is missing uuid, name", id="missing uuid and name"),
    pytest.param({"uuid": "GPU-1", "name": "x"}, "is missing index", id="missing index"),
    pytest.param({"index": -1, "uuid": "GPU-1", "name": "x"}, "index must be a non-negative integer", id="negative"),
    pytest.param({"index": "0", "uuid": "GPU-1", "name": "x"}, "index must be a non-negative integer", id="index str"),
    pytest.param(
        {"index": True, "uuid": "GPU-1", "name": "x"}, "index must be a non-negative integer", id="index bool"
    ),
    pytest.param({"index": 0, "uuid": "", "name": "x"}, "uuid must be a non-empty string", id="empty uuid"),
    pytest.param({"index": 0, "uuid": 7, "name": "x"}, "uuid must be a non-empty string", id="uuid not a string"),
    pytest.param({"index": 0, "uuid": "GPU-1", "name": None}, "name must be a non-empty string", id="name None"),
    pytest.param(
        {"index": 0, "uuid": "GPU-1", "name": "x", "memory_gb": -1},
        "memory_gb must be a non-negative number",
        id="negative memory",
    ),
    pytest.param(
        {"index": 0, "uuid": "GPU-1", "name": "x", "memory_gb": "80"},
        "memory_gb must be a non-negative number",
        id="memory str",
    ),
    pytest.param(
        {"index": 0, "uuid": "GPU-1", "name": "x", "memory_gb": True},
        "memory_gb must be a non-negative number",
        id="memory bool",
    ),
    pytest.param(
        {"index": 0, "uuid": "GPU-1", "name": "x", "host": ""}, "host must be a non-empty string", id="empty host"
    ),
]


@pytest.mark.parametrize(("data", "phrase"), BAD_SLOT_DICTS)
def test_from_dict_bad(data: Any, phrase: str) -> None:
    with pytest.raises(ValueError) as info:
        GpuSlot.from_dict(data)
    assert phrase in str(info.value)


MATCHES = [
    pytest.param("", A100, True, id="empty type matches all"),
    pytest.param("A100", A100, True, id="A100 matches NVIDIA A100-SXM4-80GB"),
    pytest.param("a100", A100, True, id="case-insensitive"),
    pytest.param("A100", "NVIDIA A100 80GB PCIe", True, id="A100 matches NVIDIA A100 80GB PCIe"),
    pytest.param("A10", "NVIDIA A100 80GB", False, id="A10 does not match an A100"),
    pytest.param("A10", A100, False, id="A10 does not match A100-SXM4"),
    pytest.param("NVIDIA A10", "NVIDIA A10", True, id="full name matches itself"),
    pytest.param("A10", "NVIDIA A10", True, id="A10 matches NVIDIA A10"),
    pytest.param("A100", "NVIDIA A10", False, id="A100 does not match an A10"),
    pytest.param("80GB", A100, True, id="a later word"),
    pytest.param("H100", A100, False, id="other model"),
    pytest.param("RTX 4090", "NVIDIA GeForce RTX 4090", True, id="two words"),
    pytest.param("A100-SXM4", A100, True, id="with punctuation"),
    pytest.param("A100.", A100, False, id="regex characters are literal"),
]


@pytest.mark.parametrize(("gpu_type", "name", "expected"), MATCHES)
def test_matches(gpu_type: str, name: str, expected: bool) -> None:
    assert GpuSlot(index=0, uuid="GPU-0", name=name, memory_gb=0).matches(gpu_type) is expected


# ----- inventory_from_config --------------------------------------------------------------------------------

CONFIGURED = [
    {"index": 0, "uuid": "GPU-aaa", "name": A100, "memory_gb": 80},
    {"index": 1, "uuid": "GPU-bbb", "name": A100, "memory_gb": 80},
    {"index": 2, "uuid": "GPU-ccc", "name": H100, "memory_gb": 80},
]


@pytest.mark.parametrize(
    ("gpu_ids", "indices"),
    [
        ((), [0, 1, 2]),
        ([0, 2], [0, 2]),
        (["1"], [1]),
        (["GPU-ccc"], [2]),
        ([0, "GPU-bbb"], [0, 1]),
        ([7], []),
    ],
    ids=["all", "by index", "index as string", "by uuid", "mixed", "no such GPU"],
)
def test_inventory_from_config_gpu_ids(gpu_ids: list[int | str], indices: list[int]) -> None:
    assert [s.index for s in inventory_from_config(CONFIGURED, gpu_ids)] == indices


def test_inventory_from_config_refuses_duplicates() -> None:
    entries = [*CONFIGURED, {"index": 5, "uuid": "GPU-aaa", "name": A100}]
    with pytest.raises(ValueError, match="gpu_inventory lists the same GPU twice: local/GPU-aaa"):
        inventory_from_config(entries)


def test_inventory_from_config_same_uuid_on_two_hosts() -> None:
    entries = [{"index": 0, "uuid": "GPU-1", "name": A100}, {"index": 0, "uuid": "GPU-1", "name": A100, "host": "b"}]
    assert [s.key for s in inventory_from_config(entries)] == ["local/GPU-1", "b/GPU-1"]


def test_inventory_from_config_bad_entry() -> None:
    with pytest.raises(ValueError, match="is missing uuid"):
        inventory_from_config([{"index": 0, "name": A100}])


# ----- load_inventory ---------------------------------------------------------------------------------------


async def test_load_inventory_configured() -> None:
    slots = await load_inventory(CONFIGURED, gpu_ids=["GPU-ccc", 0])
    assert [(s.index, s.name) for s in slots] == [(0, A100), (2, H100)]


async def test_load_inventory_configured_empty_list() -> None:
    assert await load_inventory([]) == []


async def test_load_inventory_configured_bad() -> None:
    with pytest.raises(ValueError, match="is missing"):
        await load_inventory([{"index": 0}])


def _nvml_gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


async def test_load_inventory_nvml_does_not_raise() -> None:
    slots = await load_inventory(None, timeout_seconds=20)
    assert len(slots) == _nvml_gpu_count()
    assert read_nvml_inventory() == slots
