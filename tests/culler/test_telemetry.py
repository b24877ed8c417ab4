"""Unit tests for dolab_services.culler.telemetry: the sources the culler reads GPU use from.

NVML is exercised through the stand-in pynvml of tests/core/test_gpus.py (no GPU on these machines), extended with
the two calls telemetry makes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dolab_core import gpus
from dolab_core.gpus import LOCAL_HOST
from dolab_services.culler import telemetry
from dolab_services.culler.telemetry import (
    FileTelemetry,
    NvmlTelemetry,
    StaticTelemetry,
    TelemetrySource,
    load_telemetry,
)
from tests.core.test_gpus import NVMLError, fake_pynvml


def slot(uuid: str, host: str = LOCAL_HOST, index: int = 0) -> dict[str, Any]:
    """A slot dict as spawner state stores it."""
    return {"index": index, "uuid": uuid, "name": "NVIDIA A100-SXM4-80GB", "memory_gb": 80.0, "host": host}


SLOTS = [slot("GPU-a"), slot("GPU-b", index=1)]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == telemetry.__name__ and r.levelno == logging.WARNING]


def test_local_host_is_the_spawners() -> None:
    assert telemetry.LOCAL_HOST is LOCAL_HOST, "the culler reads the host the spawner writes (dolab_core.gpus)"


# ----- StaticTelemetry --------------------------------------------------------------------------------------


async def test_static_answers_only_the_gpus_asked_for_and_known() -> None:
    source = StaticTelemetry({"GPU-a": 95, "GPU-z": 50})
    assert await source.gpu_percent([*SLOTS, slot("GPU-a", host="node-2")]) == {"GPU-a": 95.0}
    assert await source.gpu_percent([]) == {}
    source.percent["GPU-b"] = 3
    assert await source.gpu_percent(SLOTS) == {"GPU-a": 95.0, "GPU-b": 3.0}
    assert source.calls == [["GPU-a", "GPU-b"], [], ["GPU-a", "GPU-b"]]
    await source.close()
    assert source.closed
    assert isinstance(source, TelemetrySource)


async def test_malformed_slots_are_skipped() -> None:
    source = StaticTelemetry({"GPU-a": 95})
    odd: list[Any] = ["GPU-a", {"uuid": ""}, {"uuid": 7}, {"index": 0}, slot("GPU-a")]
    assert await source.gpu_percent(odd) == {"GPU-a": 95.0}


# ----- FileTelemetry ----------------------------------------------------------------------------------------


async def test_file_good(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"GPU-a": 87.5, "GPU-b": 0, "GPU-other": 100}))
    source = FileTelemetry(path)
    assert await source.gpu_percent(SLOTS) == {"GPU-a": 87.5, "GPU-b": 0.0}
    # Read again on every call: a feeder only rewrites the file.
    path.write_text(json.dumps({"GPU-a": 3}))
    assert await source.gpu_percent(SLOTS) == {"GPU-a": 3.0}
    await source.close()


async def test_file_lists_gpus_of_any_host(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"GPU-remote": 60}))
    assert await FileTelemetry(str(path)).gpu_percent([slot("GPU-remote", host="node-7")]) == {"GPU-remote": 60.0}


async def test_file_values_that_are_not_numbers_are_left_out(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    path.write_text('{"GPU-a": "90", "GPU-b": null, "GPU-c": true, "GPU-d": [1], "GPU-e": NaN, "GPU-f": 42}')
    uuids = ["GPU-a", "GPU-b", "GPU-c", "GPU-d", "GPU-e", "GPU-f"]
    assert await FileTelemetry(path).gpu_percent([slot(u) for u in uuids]) == {"GPU-f": 42.0}


BAD_FILES = [
    pytest.param(None, "does not exist", id="missing file"),
    pytest.param("{not json", "is not valid JSON", id="bad JSON"),
    pytest.param("", "is not valid JSON", id="empty file"),
    pytest.param("[90, 10]", "must hold a JSON object", id="a list, not an object"),
    pytest.param(b"\xff\xfe{}", "Cannot read", id="not UTF-8"),
]


@pytest.mark.parametrize(("content", "phrase"), BAD_FILES)
async def test_file_bad_gives_nothing_and_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | bytes | None, phrase: str
) -> None:
    path = tmp_path / "gpu.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    source = FileTelemetry(path)
    with caplog.at_level(logging.WARNING, logger=telemetry.__name__):
        assert await source.gpu_percent(SLOTS) == {}
        assert await source.gpu_percent(SLOTS) == {}
    messages = warnings_of(caplog)
    assert len(messages) == 1
    assert phrase in messages[0] and str(path) in messages[0]


async def test_file_warns_again_after_it_was_good(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "gpu.json"
    source = FileTelemetry(path)
    with caplog.at_level(logging.WARNING, logger=telemetry.__name__):
        assert await source.gpu_percent(SLOTS) == {}
        path.write_text('{"GPU-a": 50}')
        assert await source.gpu_percent(SLOTS) == {"GPU-a": 50.0}
        path.unlink()
        assert await source.gpu_percent(SLOTS) == {}
        path.write_text("{oops")
        assert await source.gpu_percent(SLOTS) == {}
    assert len(warnings_of(caplog)) == 3


async def test_file_without_slots_is_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=telemetry.__name__):
        assert await FileTelemetry(tmp_path / "absent.json").gpu_percent([]) == {}
    assert warnings_of(caplog) == []


# ----- load_telemetry ---------------------------------------------------------------------------------------


class GoodSource:
    """A custom source as an admin would write one."""

    async def gpu_percent(self, slots: Any) -> dict[str, float]:
        return {s["uuid"]: 99.0 for s in slots}

    async def close(self) -> None:
        pass


class NoGpuPercent:
    async def close(self) -> None:
        pass


class Exploding:
    def __init__(self) -> None:
        raise RuntimeError("no credentials configured")


NOT_A_CLASS = 42


async def test_load_nvml() -> None:
    source = load_telemetry("nvml")
    assert isinstance(source, NvmlTelemetry)
    await source.close()


def test_load_file() -> None:
    source = load_telemetry("file:/run/dolab/gpu.json")
    assert isinstance(source, FileTelemetry)
    assert source.path == Path("/run/dolab/gpu.json")


async def test_load_custom_class() -> None:
    source = load_telemetry(" tests.culler.test_telemetry:GoodSource ")
    assert isinstance(source, GoodSource)
    assert isinstance(source, TelemetrySource)
    assert await source.gpu_percent([slot("GPU-a")]) == {"GPU-a": 99.0}


BAD_SPECS = [
    pytest.param("", "is empty", id="empty"),
    pytest.param("   ", "is empty", id="blank"),
    pytest.param("file:", "names no file", id="file without a path"),
    pytest.param("dcgm", "is not understood", id="unknown word"),
    pytest.param("tests.culler.test_telemetry:", "is not understood", id="no class name"),
    pytest.param(":GoodSource", "is not understood", id="no module"),
    pytest.param("tests.culler.test_telemetry:Good-Source", "is not understood", id="class name not an identifier"),
    pytest.param("dolab_no_such_module:Source", "cannot import dolab_no_such_module", id="module not found"),
    pytest.param("tests.culler.test_telemetry:Missing", "has no class Missing", id="class not found"),
    pytest.param("tests.culler.test_telemetry:NOT_A_CLASS", "has no class NOT_A_CLASS", id="not callable"),
    pytest.param(
        "tests.culler.test_telemetry:NoGpuPercent", "NoGpuPercent has no gpu_percent method", id="no gpu_percent"
    ),
    pytest.param(
        "tests.culler.test_telemetry:Exploding", "Exploding() failed (no credentials configured)", id="init fails"
    ),
]


@pytest.mark.parametrize(("spec", "phrase"), BAD_SPECS)
def test_load_bad(spec: str, phrase: str) -> None:
    with pytest.raises(ValueError) as info:
        load_telemetry(spec)
    message = str(info.value)
    assert message.startswith("GPU telemetry source ")
    assert phrase in message
    if "not understood" in phrase or "is empty" in phrase:
        assert '"nvml", "file:/path/to/gpu.json" or "module.path:ClassName"' in message


# ----- NvmlTelemetry ----------------------------------------------------------------------------------------


def nvml_with_use(devices: list[dict[str, Any]]) -> types.ModuleType:
    """tests/core/test_gpus.py's stand-in pynvml, plus lookup by UUID and utilisation (the ``gpu`` key of a device)."""
    module = fake_pynvml(devices)

    def handle_by_uuid(uuid: str) -> dict[str, Any]:
        for device in devices:
            for candidate in [device, *[m for m in device.get("mig") or [] if m]]:
                if candidate.get("uuid") == uuid:
                    if candidate.get("broken"):
                        raise NVMLError("GPU is lost")
                    return candidate
        raise NVMLError("Not Found")

    def utilisation(handle: dict[str, Any]) -> types.SimpleNamespace:
        module.calls.append(f"use {handle['uuid']}")
        if "gpu" not in handle:  # a MIG instance: NVML has no utilisation for those
            raise NVMLError("Not Supported")
        if "block" in handle:
            handle["block"].wait(5)
        return types.SimpleNamespace(gpu=handle["gpu"], memory=0)

    module.nvmlDeviceGetHandleByUUID = handle_by_uuid  # type: ignore[attr-defined]
    module.nvmlDeviceGetUtilizationRates = utilisation  # type: ignore[attr-defined]
    return module


GPU_A = {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-a", "memory_gb": 80, "gpu": 97}
GPU_B = {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-b", "memory_gb": 80, "gpu": 4}
LOST = {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-lost", "memory_gb": 80, "gpu": 50, "broken": True}
MIG = {
    "name": "NVIDIA A100-SXM4-40GB",
    "uuid": "GPU-m",
    "memory_gb": 40,
    "gpu": 0,
    "mig": [{"name": "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "uuid": "MIG-1", "memory_gb": 20}],
}


@pytest.fixture(autouse=True)
def fresh_nvml_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus, "_nvml_initialised", None)


@pytest.fixture
async def nvml_source() -> Any:
    source = NvmlTelemetry(timeout_seconds=2)
    yield source
    await source.close()


def use_nvml(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType | None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", module)


async def test_nvml_reads_local_gpus(monkeypatch: pytest.MonkeyPatch, nvml_source: NvmlTelemetry) -> None:
    module = nvml_with_use([GPU_A, GPU_B])
    use_nvml(monkeypatch, module)
    assert await nvml_source.gpu_percent(SLOTS) == {"GPU-a": 97.0, "GPU-b": 4.0}
    assert await nvml_source.gpu_percent(SLOTS[:1]) == {"GPU-a": 97.0}
    # nvmlInit once and kept: no shutdown between reads.
    assert module.calls == ["init", "use GPU-a", "use GPU-b", "use GPU-a"]


async def test_nvml_reads_only_local_slots(monkeypatch: pytest.MonkeyPatch, nvml_source: NvmlTelemetry) -> None:
    module = nvml_with_use([GPU_A, GPU_B])
    use_nvml(monkeypatch, module)
    slots = [slot("GPU-a"), slot("GPU-b", host="node-2"), {"uuid": "GPU-b", "index": 1, "name": "x"}]
    assert await nvml_source.gpu_percent(slots) == {"GPU-a": 97.0, "GPU-b": 4.0}, "no host means local"
    assert await nvml_source.gpu_percent([slot("GPU-a", host="node-2")]) == {}
    assert module.calls == ["init", "use GPU-a", "use GPU-b"], "remote GPUs are not looked up"


async def test_nvml_without_local_slots_does_not_touch_nvml(
    monkeypatch: pytest.MonkeyPatch, nvml_source: NvmlTelemetry
) -> None:
    module = nvml_with_use([GPU_A])
    use_nvml(monkeypatch, module)
    assert await nvml_source.gpu_percent([]) == {}
    assert module.calls == []


async def test_nvml_a_lost_gpu_does_not_hide_the_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, nvml_source: NvmlTelemetry
) -> None:
    use_nvml(monkeypatch, nvml_with_use([GPU_A, LOST, GPU_B, MIG]))
    slots = [slot("GPU-a"), slot("GPU-lost"), slot("GPU-unknown"), slot("MIG-1"), slot("GPU-b")]
    with caplog.at_level(logging.WARNING, logger=telemetry.__name__):
        assert await nvml_source.gpu_percent(slots) == {"GPU-a": 97.0, "GPU-b": 4.0}
        assert await nvml_source.gpu_percent(slots) == {"GPU-a": 97.0, "GPU-b": 4.0}
    messages = warnings_of(caplog)
    assert len(messages) == 3, "one warning per unreadable GPU, not one per sweep"
    assert any("GPU-lost" in m and "GPU is lost" in m for m in messages)
    assert any("GPU-unknown" in m and "Not Found" in m for m in messages)
    assert any("MIG-1" in m and "Not Supported" in m for m in messages)


async def test_nvml_gpu_that_comes_back_is_warned_about_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, nvml_source: NvmlTelemetry
) -> None:
    flaky = dict(LOST)
    use_nvml(monkeypatch, nvml_with_use([flaky]))
    with caplog.at_level(logging.WARNING, logger=telemetry.__name__):
        assert await nvml_source.gpu_percent([slot("GPU-lost")]) == {}
        flaky["broken"] = False
        assert await nvml_source.gpu_percent([slot("GPU-lost")]) == {"GPU-lost": 50.0}
        flaky["broken"] = True
        assert await nvml_source.gpu_percent([slot("GPU-lost")]) == {}
    assert len(warnings_of(caplog)) == 2


async def test_nvml_init_failure_gives_nothing_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, nvml_source: NvmlTelemetry
) -> None:
    module = nvml_with_use([GPU_A])

    def no_driver() -> None:
        raise NVMLError("Driver Not Loaded")

    module.nvmlInit = no_driver  # type: ignore[attr-defined]
    use_nvml(monkeypatch, module)
    with caplog.at_level(logging.WARNING, logger=telemetry.__name__):
        assert await nvml_source.gpu_percent(SLOTS) == {}
        assert await nvml_source.gpu_percent(SLOTS) == {}
    messages = warnings_of(caplog)
    assert len(messages) == 1
    assert "NVML is not available (Driver Not Loaded)" in messages[0]
    assert module.calls == []


async def test_nvml_not_installed_gives_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, nvml_source: NvmlTelemetry
) -> None:
    use_nvml(monkeypatch, None)  # ``import pynvml`` raises ImportError
    with caplog.at_level(logging.WARNING, logger=telemetry.__name__):
        assert await nvml_source.gpu_percent(SLOTS) == {}
        assert await nvml_source.gpu_percent(SLOTS) == {}
    assert len(warnings_of(caplog)) == 1


async def test_nvml_init_is_retried_once_the_driver_is_back(
    monkeypatch: pytest.MonkeyPatch, nvml_source: NvmlTelemetry
) -> None:
    module = nvml_with_use([GPU_A])
    real_init = module.nvmlInit
    answers = [NVMLError("Driver Not Loaded"), None]

    def init() -> None:
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        real_init()

    module.nvmlInit = init  # type: ignore[attr-defined]
    use_nvml(monkeypatch, module)
    assert await nvml_source.gpu_percent(SLOTS[:1]) == {}
    assert await nvml_source.gpu_percent(SLOTS[:1]) == {"GPU-a": 97.0}
    assert module.calls == ["init", "use GPU-a"]


async def test_nvml_unexpected_error_gives_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, nvml_source: NvmlTelemetry
) -> None:
    module = nvml_with_use([GPU_A])
    del module.nvmlDeviceGetUtilizationRates  # an old nvidia-ml-py, say
    use_nvml(monkeypatch, module)
    with caplog.at_level(logging.ERROR, logger=telemetry.__name__):
        assert await nvml_source.gpu_percent(SLOTS) == {}
    assert any("Reading GPU use through NVML failed" in r.getMessage() for r in caplog.records)


@pytest.fixture
def stuck_gpu() -> Iterator[dict[str, Any]]:
    release = threading.Event()
    yield {**GPU_A, "block": release}
    release.set()


async def test_nvml_hung_read_times_out_and_is_not_queued_behind(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stuck_gpu: dict[str, Any]
) -> None:
    module = nvml_with_use([stuck_gpu])
    use_nvml(monkeypatch, module)
    source = NvmlTelemetry(timeout_seconds=0.05)
    try:
        with caplog.at_level(logging.WARNING, logger=telemetry.__name__):
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await source.gpu_percent(SLOTS[:1]) == {}
            assert await source.gpu_percent(SLOTS[:1]) == {}
            assert loop.time() - started < 1, "the event loop waited for the driver"
        messages = warnings_of(caplog)
        assert "NVML did not answer in 0.05 s" in messages[0]
        assert "still stuck in an earlier read" in messages[1]
        assert module.calls == ["init", "use GPU-a"], "the second call did not queue another read"
        # Once the driver answers, reads work again.
        stuck_gpu["block"].set()
        del stuck_gpu["block"]
        for _ in range(100):
            if not source.reader.busy:
                break
            await asyncio.sleep(0.01)
        assert await source.gpu_percent(SLOTS[:1]) == {"GPU-a": 97.0}
    finally:
        stuck_gpu.get("block", threading.Event()).set()
        await source.close()
