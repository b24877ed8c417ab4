"""This machine's GPUs and the GPU slot type: what the spawner hands out and every service reads.

A :class:`GpuSlot` is one GPU of one host (``host`` is :data:`LOCAL_HOST` for the hub's machine, else a Docker
host's name); servers record theirs in their state. :func:`load_inventory` reads the local GPUs through NVML on a
pool of one thread with a timeout, or takes them from configuration.

The services read GPU use through NVML too (the culler's ``NvmlTelemetry``, the monitor's ``NvmlSource``): both
run their reads through an :class:`NvmlReader` (a one-thread pool of its own, a timeout, no read queued behind a
stuck one, NVML initialised once for the process), and the culler's per-GPU utilisation is
:func:`read_nvml_utilisation`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

__all__ = [
    "LOCAL_HOST",
    "GpuSlot",
    "NvmlBusy",
    "NvmlReader",
    "NvmlUnavailable",
    "NvmlUtilisation",
    "inventory_from_config",
    "load_inventory",
    "read_nvml_inventory",
    "read_nvml_utilisation",
    "restrict",
]

log = logging.getLogger(__name__)

#: The host name of GPUs on the machine that runs the hub.
LOCAL_HOST = "local"


@dataclass(frozen=True)
class GpuSlot:
    """One GPU that can be handed to one server."""

    index: int
    uuid: str
    name: str
    memory_gb: float
    host: str = LOCAL_HOST
    #: The GPU's device node on its host, for engines without the NVIDIA toolkit (default /dev/nvidia<index>).
    device: str = ""

    @property
    def key(self) -> str:
        """A stable identity: the host and the GPU's UUID (indices can change across reboots)."""
        return f"{self.host}/{self.uuid}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in spawner state."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GpuSlot:
        """Build a slot from a config entry or a stored state entry, with a clear error on bad input."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a GPU entry must be a dict with index, uuid, name and memory_gb, not {data!r}")
        missing = [k for k in ("index", "uuid", "name") if k not in data]
        if missing:
            raise ValueError(f"GPU entry {dict(data)!r} is missing {', '.join(missing)}")
        index = data["index"]
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"GPU entry {dict(data)!r}: index must be a non-negative integer")
        for key in ("uuid", "name"):
            if not isinstance(data[key], str) or not data[key]:
                raise ValueError(f"GPU entry {dict(data)!r}: {key} must be a non-empty string")
        memory_gb = data.get("memory_gb", 0)
        if not isinstance(memory_gb, (int, float)) or isinstance(memory_gb, bool) or memory_gb < 0:
            raise ValueError(f"GPU entry {dict(data)!r}: memory_gb must be a non-negative number")
        host = data.get("host", LOCAL_HOST)
        if not isinstance(host, str) or not host:
            raise ValueError(f"GPU entry {dict(data)!r}: host must be a non-empty string")
        device = data.get("device", "")
        if not isinstance(device, str) or (device and not device.startswith("/")):
            raise ValueError(f"GPU entry {dict(data)!r}: device must be an absolute path such as /dev/nvidia0")
        return cls(
            index=index, uuid=data["uuid"], name=data["name"], memory_gb=float(memory_gb), host=host, device=device
        )

    def matches(self, gpu_type: str, exact: bool = False) -> bool:
        """Whether this GPU fits a profile's ``gpu_type``: whole words of the GPU name, any case.

        An empty ``gpu_type`` matches every GPU; ``"A100"`` matches ``"NVIDIA A100-SXM4-80GB"`` but
        ``"A10"`` does not (it would otherwise hand out an A100 for an A10 profile). ``exact``: the whole name.
        """
        if not gpu_type:
            return True
        if exact:
            return gpu_type.casefold() == self.name.casefold()
        pattern = rf"(?<![0-9a-z]){re.escape(gpu_type.casefold())}(?![0-9a-z])"
        return re.search(pattern, self.name.casefold()) is not None


def inventory_from_config(entries: Sequence[Mapping[str, Any]], gpu_ids: Sequence[int | str] = ()) -> list[GpuSlot]:
    """Turn ``gpu_inventory`` config into slots, keeping only ``gpu_ids`` (indices or UUIDs) when given."""
    slots = [GpuSlot.from_dict(entry) for entry in entries]
    keys = [s.key for s in slots]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"gpu_inventory lists the same GPU twice: {', '.join(duplicates)}")
    return restrict(slots, gpu_ids)


def restrict(slots: Sequence[GpuSlot], gpu_ids: Sequence[int | str]) -> list[GpuSlot]:
    """Keep the slots named in ``gpu_ids`` (an index or a UUID each); all of them when it is empty."""
    if not gpu_ids:
        return list(slots)
    wanted = {str(g) for g in gpu_ids}
    return [s for s in slots if str(s.index) in wanted or s.uuid in wanted]


def read_nvml_inventory() -> list[GpuSlot]:
    """Read the local GPUs through NVML. Blocking: call it off the event loop. Empty without a driver."""
    try:
        import pynvml
    except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        log.info("NVML is not available (%s): no local GPUs", e)
        return []
    try:
        slots: list[GpuSlot] = []
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as e:
            log.warning("NVML cannot count the GPUs (%s): no local GPUs", e)
            return []
        for index in range(count):
            try:
                slots.extend(_nvml_device_slots(pynvml, index))
            except pynvml.NVMLError as e:
                # One broken GPU (fallen off the bus, say) must not hide the others.
                log.warning("NVML cannot read GPU %d (%s): leaving it out", index, e)
        return slots
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _nvml_device_slots(pynvml: Any, index: int) -> list[GpuSlot]:
    """One slot per GPU, or one per MIG instance when MIG is on (CUDA then sees only the instances)."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    try:
        mig_on = pynvml.nvmlDeviceGetMigMode(handle)[0] == pynvml.NVML_DEVICE_MIG_ENABLE
    except pynvml.NVMLError:  # not a MIG-capable GPU
        mig_on = False
    handles = [handle]
    if mig_on:
        handles = []
        for mig_index in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                handles.append(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, mig_index))
            except pynvml.NVMLError:  # an empty MIG position
                continue
    return [
        GpuSlot(
            index=index,
            uuid=_text(pynvml.nvmlDeviceGetUUID(h)),
            name=_text(pynvml.nvmlDeviceGetName(h)),
            memory_gb=round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30, 1),
        )
        for h in handles
    ]


# NVML is called from one small pool: a hung driver call must not take the hub's default executor with it.
_nvml_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dolab-nvml")
_nvml_lock = threading.Lock()


def _read_nvml_locked() -> list[GpuSlot]:
    with _nvml_lock:
        return read_nvml_inventory()


async def load_inventory(
    configured: Sequence[Mapping[str, Any]] | None,
    gpu_ids: Sequence[int | str] = (),
    timeout_seconds: float = 20,
) -> list[GpuSlot] | None:
    """The GPUs to hand out: ``configured`` when set (hosts without NVML, tests), else NVML, off the loop.

    None when NVML did not answer in time: the caller should treat the host as GPU-less for now and ask again
    later, rather than for the rest of the hub's life.
    """
    if configured is not None:
        return inventory_from_config(configured, gpu_ids)
    loop = asyncio.get_running_loop()
    try:
        found = await asyncio.wait_for(loop.run_in_executor(_nvml_pool, _read_nvml_locked), timeout_seconds)
    except asyncio.TimeoutError:
        log.error("NVML did not answer in %s s: no local GPUs for now", timeout_seconds)
        return None
    return restrict(found, gpu_ids)


# ----- reading GPU use (the services) -----------------------------------------------------------------------

T = TypeVar("T")

#: The pynvml module that ``nvmlInit`` succeeded on; a service keeps NVML initialised for its whole life.
_nvml_initialised: Any = None


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used at all (nvidia-ml-py missing, no driver); the message says why."""


class NvmlBusy(RuntimeError):
    """An earlier NVML read is still stuck in the driver, so this one was not queued behind it."""


def _initialised_nvml() -> Any:
    """pynvml, initialised once for the process (again after a failure). Call it with ``_nvml_lock`` held."""
    global _nvml_initialised
    try:
        import pynvml
    except ImportError as e:
        raise NvmlUnavailable(f"nvidia-ml-py is not installed ({e})") from None
    # Comparing modules, not a flag: a stand-in pynvml in the tests needs its own init.
    if _nvml_initialised is not pynvml:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise NvmlUnavailable(str(e)) from None
        _nvml_initialised = pynvml
    return pynvml


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned read's outcome as seen, so asyncio does not report it as never retrieved."""
    if not future.cancelled():
        future.exception()


class NvmlReader:
    """Blocking NVML reads off the event loop: a one-thread pool of its own, each read bounded by a timeout.

    :meth:`read` runs ``fn(pynvml, *args)`` with NVML initialised (once for the process, one reader at a time).
    A read that takes longer than ``timeout_seconds`` raises :class:`asyncio.TimeoutError`; while it is still stuck
    in the driver, later reads raise :class:`NvmlBusy` rather than queue behind it (the thread cannot be stopped).
    """

    def __init__(self, timeout_seconds: float = 5.0, thread_name_prefix: str = "dolab-nvml") -> None:
        self.timeout_seconds = timeout_seconds
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name_prefix)
        self._pending: asyncio.Future[Any] | None = None

    @property
    def busy(self) -> bool:
        """Whether an earlier read is still running (stuck in the driver, after its timeout)."""
        return self._pending is not None and not self._pending.done()

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(pynvml, *args)`` on the pool. Raises :class:`NvmlUnavailable`, :class:`NvmlBusy`,
        :class:`asyncio.TimeoutError`, or what ``fn`` raised."""
        if self.busy:
            raise NvmlBusy("NVML is still stuck in an earlier read")

        def locked() -> T:
            with _nvml_lock:
                return fn(_initialised_nvml(), *args)

        loop = asyncio.get_running_loop()
        self._pending = pending = loop.run_in_executor(self._pool, locked)
        pending.add_done_callback(_retrieve)
        # shield: on a timeout the thread cannot be stopped, and ``_pending`` must stay undone until it ends.
        result: T = await asyncio.wait_for(asyncio.shield(pending), self.timeout_seconds)
        return result

    def close(self) -> None:
        """Let the pool's thread go; NVML itself stays initialised for the process."""
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class NvmlUtilisation:
    """What :func:`read_nvml_utilisation` read: percent per GPU uuid, and NVML's error for each GPU it could not."""

    percent: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def read_nvml_utilisation(pynvml: Any, uuids: Sequence[str]) -> NvmlUtilisation:
    """The utilisation of the GPUs ``uuids``. Blocking: run it through :meth:`NvmlReader.read`."""
    reading = NvmlUtilisation()
    for uuid in uuids:
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            reading.percent[uuid] = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except pynvml.NVMLError as e:
            # A GPU fallen off the bus, or a MIG instance (NVML has no utilisation for those).
            reading.errors[uuid] = str(e)
    return reading
