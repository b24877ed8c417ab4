"""Telemetry sources (file, module, NVML through a stand-in pynvml) and reading servers from hub models."""

from __future__ import annotations

import json
import sys
import types
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from dolab_core import gpus
from dolab_services.monitor.runs import GpuPrices, server_runs
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


def hub_user(name: str, state: dict[str, Any], started: str = "2026-11-26T10:00:00Z", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "groups": ["g"],
        "servers": {"": {"started": started, "ready": True, "state": state, **extra}},
    }


@pytest.mark.parametrize(
    ("state", "gpus", "usd"),
    [
        ({"backend": "local", "slots": [{"uuid": "u0", "name": "NVIDIA A100 80GB"}]}, {"NVIDIA A100 80GB": 1}, 1.5),
        (
            {
                "backend": "docker",
                "slots": [{"uuid": "u0", "name": "NVIDIA A10"}, {"uuid": "u1", "name": "NVIDIA A10"}],
            },
            {"NVIDIA A10": 2},
            0.8,
        ),
        ({"backend": "local", "slots": []}, {}, 0.0),
        (
            {"backend": "runpod", "price_per_hour_usd": 2.5, "gpu_type": "RTX 4090", "gpu_count": 2},
            {"RTX 4090": 2},
            2.5,
        ),
        ({"backend": "runpod", "gpu_type": "RTX 4090"}, {"RTX 4090": 1}, 0.0),  # no price yet: 0
        (  # what the RunPod backend saves: its keys under backend_state
            {
                "backend": "runpod",
                "slots": [],
                "backend_state": {
                    "pod_id": "p1",
                    "gpu_type_id": "NVIDIA A100 80GB PCIe",
                    "gpu_count": 2,
                    "price_per_hour_usd": 3.58,
                },
            },
            {"NVIDIA A100 80GB PCIe": 2},
            3.58,
        ),
        ({"backend": "runpod", "price_per_hour_usd": "cheap"}, {}, 0.0),
        ({}, {}, 0.0),  # not a DO-LAB server (no state readable)
    ],
    ids=[
        "local-a100",
        "docker-2xa10",
        "cpu",
        "runpod",
        "runpod-no-price",
        "runpod-backend-state",
        "runpod-bad-price",
        "no-state",
    ],
)
def test_server_runs_from_hub_models(state: dict[str, Any], gpus: dict[str, int], usd: float) -> None:
    prices = GpuPrices.from_config({"A100": 1.5, "A10": 0.4})
    [run] = server_runs([hub_user("ana", state)], prices)
    assert dict(run.gpus) == gpus and run.usd_per_hour == pytest.approx(usd)
    assert run.groups == ("g",) and run.run == "2026-11-26T10:00:00Z"
    assert run.metered == (bool(gpus) or usd > 0)


def test_servers_without_a_start_time_are_skipped() -> None:
    assert server_runs([hub_user("ana", {}, started=None)], GpuPrices()) == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "price"),
    [("NVIDIA A100-SXM4-80GB", 2.0), ("NVIDIA A100 80GB PCIe", 2.0), ("NVIDIA A10", 0.5), ("Tesla T4", 0.0)],
)
def test_gpu_prices_match_whole_words(name: str, price: float) -> None:
    prices = GpuPrices.from_config({"A100": 2.0, "A10": 0.5, "A100 80GB PCIe": 2.0})
    assert prices.price(name) == price


def test_bad_gpu_prices_are_refused() -> None:
    with pytest.raises(ValueError, match="must be 0 or more USD per GPU-hour"):
        GpuPrices.from_config({"A100": -1})
