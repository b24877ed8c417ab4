"""Where the monitor's GPU readings come from: the telemetry source interface and the sources DO-LAB ships.

A *source* reports every GPU it can see, busy or free, at each sampling tick::

    class TelemetrySource(Protocol):
        async def read(self) -> list[GpuReading]: ...
        async def close(self) -> None: ...

A :class:`GpuReading` has the GPU's ``uuid`` (the key the spawner's slots carry), its ``host`` (``"local"`` for
this machine, else the Docker host's name in ``docker_hosts``), ``index`` and ``name``, and whatever the source
knows of its utilisation (percent), memory (GB used, GB total), temperature (deg C), power (W) and the processes
using it (pid, GB). Unknown values are None. The monitor maps each GPU to the server whose spawner state holds
its slot, so the processes of a GPU are that server's; processes on a GPU no server holds are shown to admins as
unattributed.

A source must not block the event loop (run blocking calls in a small pool of its own, with a timeout), must not
raise because one GPU cannot be read (leave it out or give it None values, and log), and should answer within a
few seconds; the monitor gives up on a read after ``--telemetry-timeout`` seconds.

Sources, chosen by the monitor's ``--telemetry`` setting (:func:`load_source`):

- ``"nvml"``: :class:`NvmlSource`, this machine's GPUs through NVML (one thread, a timeout; nothing without a
  driver, logged once).
- ``"file:/path/to/gpus.json"``: :class:`FileSource`, a JSON list of readings (the :meth:`GpuReading.to_json`
  keys; ``uuid`` required) that another tool keeps current, written atomically (temporary file, then rename).
  This is how a remote host's agent, a DCGM scrape or a test feeds the monitor.
- ``"some.module:ClassName"``: your own source, built with no arguments.

RunPod pods need no source: their price and, where the backend records it, their GPU use come from the spawner
state the hub keeps (see :mod:`.runs`).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dolab_core.gpus import LOCAL_HOST, NvmlBusy, NvmlReader, NvmlUnavailable

__all__ = [
    "FileSource",
    "GpuProcess",
    "GpuReading",
    "NvmlSource",
    "StaticSource",
    "TelemetrySource",
    "load_source",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuProcess:
    """A process using a GPU: its pid (in the GPU host's pid namespace) and the GPU memory it holds."""

    pid: int
    memory_gb: float | None = None


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one instant. See the module docstring."""

    uuid: str
    host: str = LOCAL_HOST
    index: int | None = None
    name: str = ""
    utilization_percent: float | None = None
    memory_used_gb: float | None = None
    memory_total_gb: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    processes: tuple[GpuProcess, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The JSON form (the file source reads the same keys)."""
        data = asdict(self)
        data["processes"] = [asdict(p) for p in self.processes]
        return data

    @classmethod
    def from_json(cls, data: Any) -> GpuReading:
        """A reading from its JSON form; ValueError for one without a uuid. Bad numbers become None."""
        if not isinstance(data, dict) or not isinstance(data.get("uuid"), str) or not data["uuid"]:
            raise ValueError(f"a GPU reading needs a uuid: {data!r}")
        processes = []
        for p in data.get("processes") or ():
            if isinstance(p, dict) and isinstance(p.get("pid"), int):
                processes.append(GpuProcess(int(p["pid"]), _number(p.get("memory_gb"))))
        index = data.get("index")
        return cls(
            uuid=data["uuid"],
            host=str(data.get("host") or LOCAL_HOST),
            index=index if isinstance(index, int) and not isinstance(index, bool) else None,
            name=str(data.get("name") or ""),
            utilization_percent=_number(data.get("utilization_percent")),
            memory_used_gb=_number(data.get("memory_used_gb")),
            memory_total_gb=_number(data.get("memory_total_gb")),
            temperature_c=_number(data.get("temperature_c")),
            power_w=_number(data.get("power_w")),
            processes=tuple(processes),
        )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@runtime_checkable
class TelemetrySource(Protocol):
    """Every GPU a source sees, at each tick. See the module docstring for the contract."""

    async def read(self) -> list[GpuReading]:
        """The current reading of every GPU this source knows."""
        ...

    async def close(self) -> None:
        """Free what the source holds."""
        ...


class StaticSource:
    """Fixed readings, for tests and benchmarks: change ``readings`` to change them."""

    def __init__(self, readings: list[GpuReading] | None = None) -> None:
        self.readings = list(readings or [])
        self.reads = 0

    async def read(self) -> list[GpuReading]:
        """The configured readings."""
        self.reads += 1
        return list(self.readings)

    async def close(self) -> None:
        """Nothing to free."""


class FileSource:
    """Readings from a JSON file (a list of reading objects), read again at every tick.

    A missing, unreadable or malformed file gives no readings and one warning (again only after it was good in
    between); an entry without a uuid is left out.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._problem = ""

    async def read(self) -> list[GpuReading]:
        """The file's readings."""
        # A small local file: reading it inline costs less than a trip through a pool.
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return self._none("missing", "GPU telemetry file %s does not exist: no GPU readings", self.path)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return self._none("bad", "Cannot read GPU telemetry file %s (%s): no GPU readings", self.path, e)
        if isinstance(data, dict):
            data = data.get("gpus")
        if not isinstance(data, list):
            return self._none("shape", "GPU telemetry file %s must hold a JSON list of GPU readings", self.path)
        self._problem = ""
        readings = []
        for entry in data:
            try:
                readings.append(GpuReading.from_json(entry))
            except ValueError as e:
                log.debug("GPU telemetry file %s: %s", self.path, e)
        return readings

    def _none(self, problem: str, message: str, *args: Any) -> list[GpuReading]:
        if problem != self._problem:
            log.warning(message, *args)
            self._problem = problem
        return []

    async def close(self) -> None:
        """Nothing to free."""


def _gb(value: Any) -> float:
    return round(float(value) / 2**30, 3)


def read_nvml(pynvml: Any) -> list[GpuReading]:
    """Every local GPU through an initialised ``pynvml`` (blocking: :class:`NvmlSource` runs it through its
    :class:`~dolab_core.gpus.NvmlReader`)."""
    readings = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            name = pynvml.nvmlDeviceGetName(handle)
        except pynvml.NVMLError as e:
            log.debug("NVML cannot read GPU %d (%s)", index, e)
            continue
        memory = _nvml_value(pynvml, pynvml.nvmlDeviceGetMemoryInfo, handle)
        readings.append(
            GpuReading(
                uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                host=LOCAL_HOST,
                index=index,
                name=name.decode() if isinstance(name, bytes) else str(name),
                utilization_percent=_nvml_value(
                    pynvml, lambda h: float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu), handle
                ),
                memory_used_gb=_gb(memory.used) if memory is not None else None,
                memory_total_gb=_gb(memory.total) if memory is not None else None,
                temperature_c=_nvml_value(
                    pynvml, lambda h: float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)), handle
                ),
                power_w=_nvml_value(pynvml, lambda h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0, handle),
                processes=_nvml_processes(pynvml, handle),
            )
        )
    return readings


def _nvml_value(pynvml: Any, read: Callable[[Any], Any], handle: Any) -> Any:
    """One reading of a GPU; None when this GPU does not support it (MIG, some boards): unknown."""
    try:
        return read(handle)
    except pynvml.NVMLError:
        return None


def _nvml_processes(pynvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    """The compute and graphics processes on a GPU, by pid, with the GPU memory each holds when NVML says."""
    processes: dict[int, GpuProcess] = {}
    for lister in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            for p in getattr(pynvml, lister)(handle):
                used = getattr(p, "usedGpuMemory", None)
                processes[int(p.pid)] = GpuProcess(int(p.pid), _gb(used) if isinstance(used, int) else None)
        except (pynvml.NVMLError, AttributeError):
            continue
    return tuple(sorted(processes.values(), key=lambda p: p.pid))


class NvmlSource:
    """This machine's GPUs through NVML, through a :class:`~dolab_core.gpus.NvmlReader` of its own (one thread,
    each read bounded by ``timeout_seconds``).

    While a read is stuck in the driver, later ticks get no readings rather than queue behind it.
    """

    def __init__(self, timeout_seconds: float = 5.0) -> None:
        self.timeout_seconds = timeout_seconds
        self.reader = NvmlReader(timeout_seconds, thread_name_prefix="dolab-monitor-nvml")
        self._unavailable = ""

    async def read(self) -> list[GpuReading]:
        """Every local GPU NVML can read."""
        try:
            readings = await self.reader.read(read_nvml)
        except NvmlBusy:
            log.warning("NVML is still stuck in an earlier read: no GPU readings this tick")
            return []
        except asyncio.TimeoutError:
            log.warning("NVML did not answer in %g s: no GPU readings this tick", self.timeout_seconds)
            return []
        except NvmlUnavailable as e:
            if str(e) != self._unavailable:
                log.warning("NVML is not available (%s): no readings of local GPUs", e)
                self._unavailable = str(e)
            return []
        except Exception:
            log.exception("Reading the GPUs through NVML failed")
            return []
        self._unavailable = ""
        return readings

    async def close(self) -> None:
        """Let the thread go; NVML stays initialised for the process."""
        self.reader.close()


def load_source(spec: str) -> TelemetrySource:
    """The source ``spec`` names: ``"nvml"``, ``"file:/path.json"`` or ``"module.path:ClassName"``.

    ValueError with a sentence saying what is wrong and what is allowed.
    """
    allowed = 'use "nvml", "file:/path/to/gpus.json" or "module.path:ClassName"'
    spec = (spec or "").strip()
    if not spec:
        raise ValueError(f"the GPU telemetry source is empty; {allowed}")
    if spec == "nvml":
        return NvmlSource()
    if spec.startswith("file:"):
        path = spec[len("file:") :]
        if not path:
            raise ValueError(f"GPU telemetry source {spec!r} names no file; {allowed}")
        return FileSource(path)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise ValueError(f"GPU telemetry source {spec!r} is not understood; {allowed}")
    try:
        factory = getattr(importlib.import_module(module_name), attr, None)
    except ImportError as e:
        raise ValueError(f"GPU telemetry source {spec!r}: cannot import {module_name} ({e})") from None
    if not callable(factory):
        raise ValueError(f"GPU telemetry source {spec!r}: {module_name} has no class {attr}")
    try:
        source = factory()
    except Exception as e:
        raise ValueError(f"GPU telemetry source {spec!r}: {attr}() failed ({e})") from None
    if not all(callable(getattr(source, m, None)) for m in ("read", "close")):
        raise ValueError(
            f"GPU telemetry source {spec!r}: {attr} needs async read() and close() methods;"
            " see dolab_services.monitor.telemetry"
        )
    return source
