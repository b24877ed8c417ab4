"""Telemetry sources (file, module, NVML through a stand-in pynvml)."""

from __future__ import annotations

import json
import sys
import types
from datetime import datetime, timezone
from pathlib import Path

import pytest

from dolab_core import gpus
from dolab_services.monitor.telemetry import FileSource, GpuReading, NvmlSource, StaticSource, load_source

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


async def test_file_source_reads_a_list_and_skips_bad_entries(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(
        json.dumps(
            [
                {"uuid": "GPU-a", "index": 0, "name": "A100", "utilization_percent": 50, "processes": [{"pid": 7}]},
                {"uuid": "GPU-b", "host": "gpu2", "utilization_percent": "busy", "power_w": 120.5},
                {"index": 3},
            ]
        )
    )
    readings = await FileSource(path).read()
    assert [r.uuid for r in readings] == ["GPU-a", "GPU-b"]
    assert readings[0].processes[0].pid == 7 and readings[0].utilization_percent == 50
    assert readings[1].host == "gpu2" and readings[1].utilization_percent is None and readings[1].power_w == 120.5
    assert GpuReading.from_json(readings[0].to_json()) == readings[0]


@pytest.mark.parametrize("content", [None, "not json", '{"gpus": 3}', "42"], ids=["missing", "bad", "shape", "number"])
async def test_file_source_without_a_good_file_gives_nothing(
    tmp_path: Path, content: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gpus.json"
    if content is not None:
        path.write_text(content)
    source = FileSource(path)
    assert await source.read() == [] and await source.read() == []
    assert len([r for r in caplog.records if "GPU telemetry file" in r.getMessage()]) == 1, "logged once"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "is empty"),
        ("file:", "names no file"),
        ("nonsense", "is not understood"),
        ("no.such.module:Source", "cannot import no.such.module"),
        ("json:Nope", "json has no class Nope"),
        ("json:JSONDecoder", "needs async read() and close() methods"),
    ],
)
def test_load_source_refuses_with_a_sentence(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        load_source(spec)
    assert message in str(e.value)


def test_load_source_builds_each_kind(tmp_path: Path) -> None:
    assert isinstance(load_source("nvml"), NvmlSource)
    assert isinstance(load_source(f"file:{tmp_path}/x.json"), FileSource)
    assert isinstance(load_source("dolab_services.monitor.telemetry:StaticSource"), StaticSource)


def fake_pynvml(fail_power: bool = False) -> types.ModuleType:
    """A stand-in pynvml with two GPUs; GPU 1 has no power reading and a process."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    nvml.NVMLError = NVMLError  # type: ignore[attr-defined]
    nvml.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = lambda h: f"GPU-{h}".encode()  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda h: "NVIDIA A100 80GB"  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=10 * (h + 1))  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2**30 * (h + 1), total=80 * 2**30)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetTemperature = lambda h, kind: 50 + h  # type: ignore[attr-defined]

    def power(h: int) -> int:
        if h == 1:
            raise NVMLError("Not Supported")
        return 250_000

    nvml.nvmlDeviceGetPowerUsage = power  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: (  # type: ignore[attr-defined]
        [types.SimpleNamespace(pid=4242, usedGpuMemory=3 * 2**30)] if h == 1 else []
    )
    nvml.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []  # type: ignore[attr-defined]
    return nvml


async def test_nvml_source_reads_every_gpu_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    monkeypatch.setattr(gpus, "_nvml_initialised", None)
    source = NvmlSource()
    readings = await source.read()
    await source.close()
    assert [(r.uuid, r.index, r.utilization_percent, r.temperature_c) for r in readings] == [
        ("GPU-0", 0, 10.0, 50.0),
        ("GPU-1", 1, 20.0, 51.0),
    ]
    assert readings[0].power_w == 250.0 and readings[1].power_w is None
    assert readings[1].memory_used_gb == 2.0 and readings[1].memory_total_gb == 80.0
    assert [(p.pid, p.memory_gb) for p in readings[1].processes] == [(4242, 3.0)]


async def test_nvml_source_without_a_driver_gives_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    nvml = fake_pynvml()

    def no_driver() -> None:
        raise nvml.NVMLError("Driver Not Loaded")  # type: ignore[attr-defined]

    nvml.nvmlInit = no_driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(gpus, "_nvml_initialised", None)
    source = NvmlSource()
    assert await source.read() == [] and await source.read() == []
    await source.close()
    assert caplog.text.count("NVML is not available (Driver Not Loaded)") == 1
