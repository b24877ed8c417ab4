"""How the culler reads GPU use: the telemetry interface (the monitor's, which reads more, is in
:mod:`dolab_services.monitor.telemetry`; both read NVML through :class:`dolab_core.gpus.NvmlReader`).

A *telemetry source* answers one question: how busy is each of these GPUs right now? A server whose GPU is above
the policy's ``gpu_busy_percent`` counts as running work, so it is kept with no browser open even when no kernel
is executing (a training script in a terminal, say). The interface::

    class TelemetrySource(Protocol):
        async def gpu_percent(self, slots: Sequence[Mapping[str, Any]]) -> dict[str, float]: ...
        async def close(self) -> None: ...

``slots`` are the GPU slot dicts of one server's spawner state (``uuid``, ``index``, ``name``, ``host``, ...;
see :class:`dolab_core.gpus.GpuSlot`). The answer maps a GPU's ``uuid`` to its utilisation in percent (0 to 100),
for the GPUs the source knows; it leaves out the others, and the culler then decides on the server's kernels
alone. A source never raises because one GPU cannot be read: it logs and leaves that GPU out. It should answer in
a few seconds, and it must not block the event loop: run blocking calls in a small thread pool of its own, with
a timeout. ``close`` frees what the source holds when the service stops.

The sources here, chosen by the culler's telemetry setting (see :func:`load_telemetry`):

- ``"nvml"``: :class:`NvmlTelemetry`, the GPUs of the machine the service runs on (slots whose host is
  ``"local"``), read through NVML (:class:`dolab_core.gpus.NvmlReader`, shared with the monitor).
- ``"file:/path/to/gpu.json"``: :class:`FileTelemetry`, a JSON object ``{"GPU-uuid": percent, ...}`` that any
  other tool keeps up to date (a DCGM exporter scrape, ``nvidia-smi`` in a cron job, a remote host's agent). The
  file is read on every call, so writing it atomically (write a temporary file, then rename) is all a feeder needs.
- ``"some.module:ClassName"``: your own source, imported and built with no arguments. For example::

      class PrometheusGpuTelemetry:
          async def gpu_percent(self, slots):
              wanted = {s["uuid"] for s in slots}
              return {uuid: pct for uuid, pct in (await self._scrape()).items() if uuid in wanted}

          async def close(self):
              ...

RunPod pods' reported GPU use could be another source of this kind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dolab_core.gpus import LOCAL_HOST, NvmlBusy, NvmlReader, NvmlUnavailable, read_nvml_utilisation
from dolab_core.hooks import load_object

__all__ = [
    "FileTelemetry",
    "NvmlTelemetry",
    "StaticTelemetry",
    "TelemetrySource",
    "load_telemetry",
]

log = logging.getLogger(__name__)


@runtime_checkable
class TelemetrySource(Protocol):
    """Where GPU use comes from. See the module docstring for the contract."""

    async def gpu_percent(self, slots: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Utilisation in percent per GPU uuid, for the GPUs of ``slots`` this source knows."""
        ...

    async def close(self) -> None:
        """Free what the source holds (threads, connections)."""
        ...


def _uuids(slots: Sequence[Mapping[str, Any]], host: str | None = None) -> list[str]:
    """The distinct GPU uuids of ``slots`` (on ``host`` only, when given), in order; malformed entries skipped."""
    found: list[str] = []
    for slot in slots:
        if not isinstance(slot, Mapping):
            continue
        uuid = slot.get("uuid")
        if not isinstance(uuid, str) or not uuid or uuid in found:
            continue
        if host is not None and slot.get("host", LOCAL_HOST) != host:
            continue
        found.append(uuid)
    return found


def _percent(value: Any) -> float | None:
    """A utilisation reading as a float, or None when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class StaticTelemetry:
    """Fixed readings, for tests: ``StaticTelemetry({"GPU-a": 95})``. Change ``percent`` to change them."""

    def __init__(self, mapping: Mapping[str, float] | None = None):
        self.percent: dict[str, float] = dict(mapping or {})
        #: The uuids asked for, one list per call: lets a test check which servers' GPUs were read.
        self.calls: list[list[str]] = []
        self.closed = False

    async def gpu_percent(self, slots: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The configured reading of each GPU of ``slots`` that has one."""
        uuids = _uuids(slots)
        self.calls.append(uuids)
        return {u: float(self.percent[u]) for u in uuids if u in self.percent}

    async def close(self) -> None:
        """Nothing to free; records that it was called."""
        self.closed = True


class FileTelemetry:
    """GPU use from a JSON file ``{"GPU-uuid": percent, ...}``, read again on every call.

    This is the way to feed GPU use from any other tool, and what the tests use to make a GPU look busy. GPUs of
    any host may be listed. A missing or unreadable file, or one that is not a JSON object, gives no readings and
    one warning (again only after the file was good in between); a value that is not a number is left out.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._problem = ""

    async def gpu_percent(self, slots: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The file's reading of each GPU of ``slots`` it lists."""
        uuids = _uuids(slots)
        if not uuids:
            return {}
        # A small local file: reading it inline costs less than a trip through a thread pool.
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return self._no_readings("missing", "GPU telemetry file %s does not exist: no GPU use known", self.path)
        except (OSError, UnicodeDecodeError) as e:
            return self._no_readings("unreadable", "Cannot read GPU telemetry file %s (%s)", self.path, e)
        try:
            data = json.loads(text)
        except ValueError as e:
            return self._no_readings("json", "GPU telemetry file %s is not valid JSON (%s)", self.path, e)
        if not isinstance(data, dict):
            return self._no_readings(
                "shape", "GPU telemetry file %s must hold a JSON object of GPU uuid -> percent", self.path
            )
        self._problem = ""
        readings: dict[str, float] = {}
        for uuid in uuids:
            if uuid not in data:
                continue
            percent = _percent(data[uuid])
            if percent is None:
                log.debug("GPU telemetry file %s: %s is %r, not a number; left out", self.path, uuid, data[uuid])
            else:
                readings[uuid] = percent
        return readings

    def _no_readings(self, problem: str, message: str, *args: Any) -> dict[str, float]:
        if problem != self._problem:
            log.warning(message, *args)
            self._problem = problem
        return {}

    async def close(self) -> None:
        """Nothing to free."""


class NvmlTelemetry:
    """The utilisation of the local GPUs (slots whose host is ``"local"``), read through NVML.

    NVML runs through a :class:`~dolab_core.gpus.NvmlReader` of this source's own (one thread, never the event
    loop), and a read that takes longer than ``timeout_seconds`` gives no readings; while it is still stuck, later
    calls give none either rather than queue behind it. Without NVML (no driver, no GPU), every call gives no
    readings, logged once.
    """

    def __init__(self, timeout_seconds: float = 5.0):
        self.timeout_seconds = timeout_seconds
        self.reader = NvmlReader(timeout_seconds, thread_name_prefix="dolab-culler-nvml")
        self._unavailable_logged = False
        self._failing: set[str] = set()

    async def gpu_percent(self, slots: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The utilisation of each local GPU of ``slots`` that NVML can read."""
        uuids = _uuids(slots, host=LOCAL_HOST)
        if not uuids:
            return {}
        try:
            reading = await self.reader.read(read_nvml_utilisation, uuids)
        except NvmlBusy:
            log.warning("NVML is still stuck in an earlier read: no GPU use for %s this time", ", ".join(uuids))
            return {}
        except asyncio.TimeoutError:
            log.warning("NVML did not answer in %s s: no GPU use for %s", self.timeout_seconds, ", ".join(uuids))
            return {}
        except NvmlUnavailable as e:
            if not self._unavailable_logged:
                log.warning("NVML is not available (%s): no GPU use for local GPUs", e)
                self._unavailable_logged = True
            return {}
        except Exception:
            log.exception("Reading GPU use through NVML failed")
            return {}
        self._unavailable_logged = False
        for uuid, error in reading.errors.items():
            if uuid not in self._failing:
                log.warning("NVML cannot read the use of GPU %s (%s): leaving it out", uuid, error)
            else:
                log.debug("NVML still cannot read the use of GPU %s (%s)", uuid, error)
        self._failing = (self._failing - set(reading.percent)) | set(reading.errors)
        return reading.percent

    async def close(self) -> None:
        """Let the reader's thread go; NVML itself stays initialised for the process."""
        self.reader.close()


def load_telemetry(spec: str) -> TelemetrySource:
    """The source a config string names: ``"nvml"``, ``"file:/path/to.json"`` or ``"module.path:ClassName"``.

    Raises ValueError with a sentence saying what is wrong and what is allowed.
    """
    allowed = 'use "nvml", "file:/path/to/gpu.json" or "module.path:ClassName"'
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"GPU telemetry source {spec!r} is empty; {allowed}")
    spec = spec.strip()
    if spec == "nvml":
        return NvmlTelemetry()
    if spec.startswith("file:"):
        path = spec[len("file:") :]
        if not path:
            raise ValueError(f"GPU telemetry source {spec!r} names no file; {allowed}")
        return FileTelemetry(path)
    factory = load_object(spec, what="GPU telemetry source", kind="class", malformed=f"is not understood; {allowed}")
    attr = spec.partition(":")[2]
    try:
        source = factory()
    except Exception as e:
        raise ValueError(f"GPU telemetry source {spec!r}: {attr}() failed ({e})") from e
    missing = [name for name in ("gpu_percent", "close") if not callable(getattr(source, name, None))]
    if missing:
        raise ValueError(
            f"GPU telemetry source {spec!r}: {attr} has no {' or '.join(missing)} method;"
            " see dolab_services.culler.telemetry for the interface"
        )
    return source
