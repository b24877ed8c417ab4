"""ServerState: the one contract of what DoLabSpawner keeps in the hub database for a server.

The spawner writes it (``get_state``), a restarted hub reads it back (``load_state``), and every service reads it
from the hub's REST API (``admin:server_state``): the culler (profile, slots, stop time, the server's address),
the monitor (profile, backend, slots, what a rented machine costs), the sync service (the workspace folder, the
address), the reapers (the container or pod a server owns) and the ``dolab`` command. They all read it here, so a
key is renamed in one place, and a state written by an older DO-LAB still reads.

Only the hub writes spawner state, so it is trusted; it is still read defensively (a value of the wrong type reads
as absent), because a state from an older release or another spawner class must not stop a service. Unlike
``user_options``, which holds what the user sent, every value here is what the spawner validated and chose.

The stored form is a flat JSON object (what older releases wrote, plus ``version``)::

    {"version": 1, "profile": "gpu-a100", "backend": "docker", "host": "local",
     "slots": [{"index": 0, "uuid": "GPU-...", "name": "...", "memory_gb": 80.0, "host": "local"}],
     "stop_at": "2030-01-31T18:00:00Z", "backend_state": {...}, "workspace": "/srv/dolab/users/ana",
     "server_url": "http://127.0.0.1:51234/user/ana/",
     "price_per_hour_usd": 1.19, "gpu_type": "NVIDIA A100 80GB PCIe", "gpu_count": 1,
     "kept": {"reason": "...", "at": "..."}}

Version history: 0 (no ``version`` key; wave 1), 1 (``version`` added; the same keys).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .gpus import LOCAL_HOST
from .times import parse_time

__all__ = ["STATE_VERSION", "ServerState"]

#: The version this release writes. Readers accept every earlier one.
STATE_VERSION = 1


def _text(raw: Mapping[str, Any], key: str, default: str = "") -> str:
    value = raw.get(key)
    return value if isinstance(value, str) else default


def _is_mapping(value: Any) -> bool:
    return type(value) is dict or isinstance(value, Mapping)  # the hub's JSON gives dicts: skip the ABC check


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class ServerState:
    """A server's spawner state. An empty one (``ServerState()``) is a server DO-LAB has not started."""

    #: The profile slug the spawner validated.
    profile: str = ""
    #: The backend name (``local``, ``docker``, ``runpod``); "" for a state without a DO-LAB server.
    backend: str = ""
    #: The host of its GPU slots (``local`` or a Docker host's name).
    host: str = LOCAL_HOST
    #: The GPU slots it holds, as stored (:meth:`dolab_core.gpus.GpuSlot.to_dict`).
    slots: tuple[Mapping[str, Any], ...] = ()
    #: The stop time the user chose (ISO 8601, UTC), "" for none.
    stop_at: str = ""
    #: The backend's own state (container, pod, process): read it through the properties below.
    backend_state: Mapping[str, Any] = field(default_factory=dict)
    #: The workspace folder on this machine, when the backend has one (the sync service backs it up).
    workspace: str = ""
    #: The server's own address, base URL included (services read it directly, not through the proxy).
    server_url: str = ""
    #: What a rented machine costs per hour, in USD, and what it rents (RunPod); None / "" / 0 for own GPUs.
    price_per_hour_usd: float | None = None
    gpu_type: str = ""
    gpu_count: int = 0
    #: The GPU use a rented machine last reported, in percent, when the backend records it.
    gpu_utilization_percent: float | None = None
    #: Why the last stop kept the server's storage (a pre-destroy hook failed), and when; "" when it did not.
    kept_reason: str = ""
    kept_at: str = ""
    #: The version the state was written with (0: before versions).
    version: int = STATE_VERSION

    @classmethod
    def read(cls, raw: Any) -> ServerState:
        """The state a spawner wrote, of this or any earlier version; an unreadable one reads as empty.

        The culler and the monitor read every running server's state at each sweep or tick, so this stays a
        straight run of lookups (no closures, the usual dicts checked first)."""
        if not _is_mapping(raw):
            return cls(version=0)
        inner = raw.get("backend_state")
        if not _is_mapping(inner):
            inner = {}
        # A rented machine's figures: on the state since version 0, but older RunPod states had them only in
        # ``backend_state`` (``gpu_type_id``).
        price = raw.get("price_per_hour_usd")
        if price is None:
            price = inner.get("price_per_hour_usd")
        gpu_type = raw.get("gpu_type") or raw.get("gpu_type_id") or inner.get("gpu_type") or inner.get("gpu_type_id")
        count = raw.get("gpu_count")
        count = _number(inner.get("gpu_count") if count is None else count)
        use = raw.get("gpu_utilization_percent")
        if use is None:
            use = inner.get("gpu_utilization_percent")
        kept = raw.get("kept")
        kept = kept if _is_mapping(kept) else {}
        slots = raw.get("slots")
        version = raw.get("version")
        return cls(
            profile=_text(raw, "profile"),
            backend=_text(raw, "backend"),
            host=_text(raw, "host") or LOCAL_HOST,
            slots=tuple(s for s in slots if _is_mapping(s)) if isinstance(slots, (list, tuple)) and slots else (),
            stop_at=_text(raw, "stop_at"),
            backend_state=inner,
            workspace=_text(raw, "workspace"),
            server_url=_text(raw, "server_url"),
            price_per_hour_usd=_number(price),
            gpu_type=str(gpu_type or ""),
            gpu_count=int(count) if count is not None and count >= 0 else 0,
            gpu_utilization_percent=_number(use),
            kept_reason=str(kept.get("reason") or ""),
            kept_at=str(kept.get("at") or ""),
            version=version if type(version) is int else 0,
        )

    @classmethod
    def of(cls, server: Any) -> ServerState:
        """The state of a server model from the hub's REST API (its ``state``, with ``admin:server_state``)."""
        return cls.read(server.get("state") if isinstance(server, Mapping) else None)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (see the module docstring); keys without a value are left out."""
        state: dict[str, Any] = {}
        if self.backend:
            state.update(
                version=STATE_VERSION,
                profile=self.profile,
                backend=self.backend,
                host=self.host,
                slots=[dict(s) for s in self.slots],
                stop_at=self.stop_at,
                backend_state=dict(self.backend_state),
            )
            if self.price_per_hour_usd is not None:
                state.update(price_per_hour_usd=self.price_per_hour_usd, gpu_type=self.gpu_type)
                state.update(gpu_count=self.gpu_count)
            if self.workspace:
                state["workspace"] = self.workspace
            if self.server_url:
                state["server_url"] = self.server_url
        if self.kept_reason:
            state["kept"] = {"reason": self.kept_reason, "at": self.kept_at}
        return state

    @property
    def stop_time(self) -> datetime | None:
        """:attr:`stop_at` as an aware datetime; None when there is none (or it does not read as a time)."""
        return parse_time(self.stop_at)

    @property
    def pod_id(self) -> str:
        """The RunPod pod this server runs in; "" for other backends and stopped servers."""
        return _text(self.backend_state, "pod_id") if self.backend == "runpod" else ""

    @property
    def container(self) -> tuple[str, str, str]:
        """(engine, container id, container name) of a docker server; the engine is ``local`` by default."""
        engine = _text(self.backend_state, "docker_host") or self.host
        return engine, _text(self.backend_state, "object_id"), _text(self.backend_state, "object_name")
