"""The running servers as the monitor sees them, read from the hub's user models (with spawner state).

The spawner state DO-LAB's spawner saves (``admin:server_state``) says what each server holds: ``profile``,
``backend`` (``local``, ``docker``, ``runpod``), ``host`` and ``slots`` (the GPU slot dicts: ``uuid``, ``index``,
``name``, ``host``), and the backend's own state under ``backend_state``. For RunPod pods these keys are read from
the state or its ``backend_state`` (where the RunPod backend keeps them):

- ``price_per_hour_usd``: what the whole pod costs per hour (missing: 0);
- ``gpu_type_id`` (or ``gpu_type``) and ``gpu_count``: the pod's GPUs when it has no slots (no type: no GPU-hours
  are counted; no count: one);
- ``gpu_utilization_percent``: the pod's GPU use (missing: unknown).

Local and Docker GPUs cost what the admin sets per GPU-hour and GPU type (:class:`GpuPrices`, default 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dolab_core.times import parse_time

from .ledger import Charge

__all__ = ["GpuPrices", "ServerRun", "server_runs"]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class GpuPrices:
    """USD per GPU-hour by GPU type, for GPUs DO-LAB does not rent (local and Docker hosts).

    A key matches a GPU's name on whole words, any case (``"A100"`` matches ``"NVIDIA A100 80GB PCIe"``, ``"A10"``
    does not), the way profiles' ``gpu_type`` does; the longest matching key wins. No match: 0.
    """

    per_hour: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, data: Any) -> GpuPrices:
        """``{"A100": 1.2, ...}``; ValueError with a sentence for a bad entry."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError('GPU prices must be an object of GPU type -> USD per GPU-hour, e.g. {"A100": 1.2}')
        prices = {}
        for key, value in data.items():
            number = _number(value)
            if not isinstance(key, str) or not key or number is None or number < 0:
                raise ValueError(f"GPU price {key!r}: {value!r} must be 0 or more USD per GPU-hour")
            prices[key] = number
        return cls(prices)

    def price(self, gpu_name: str) -> float:
        """USD per hour of one GPU named ``gpu_name``."""
        name = gpu_name.casefold()
        best, best_len = 0.0, -1
        for key, value in self.per_hour.items():
            pattern = rf"(?<![0-9a-z]){re.escape(key.casefold())}(?![0-9a-z])"
            if len(key) > best_len and re.search(pattern, name):
                best, best_len = value, len(key)
        return best


@dataclass(frozen=True)
class ServerRun:
    """One running (or starting, or stopping) server: who, what it holds, what it costs."""

    user: str
    server: str
    groups: tuple[str, ...]
    run: str
    started: datetime
    ready: bool
    profile: str
    backend: str
    host: str
    slots: tuple[Mapping[str, Any], ...]
    gpus: Mapping[str, int]
    usd_per_hour: float
    #: Reported by the backend (RunPod), when it does.
    gpu_utilization_percent: float | None = None
    #: The hub's ``pending`` action ("spawn", "stop") or "" when none.
    pending: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """``(user, server)``."""
        return (self.user, self.server)

    @property
    def gpu_count(self) -> int:
        """How many GPUs it holds."""
        return sum(self.gpus.values())

    @property
    def metered(self) -> bool:
        """Whether it uses what quotas count: GPUs or money."""
        return self.gpu_count > 0 or self.usd_per_hour > 0

    def charge(self) -> Charge:
        """What the ledger bills for it."""
        return Charge(
            self.user, self.server, self.run, self.started.timestamp(), self.backend, self.gpus, self.usd_per_hour
        )


def server_runs(users: Iterable[Mapping[str, Any]], prices: GpuPrices) -> list[ServerRun]:
    """Every server of the hub's ``users`` models that has started; malformed entries are skipped."""
    runs = []
    for user in users:
        name = user.get("name")
        if not isinstance(name, str):
            continue
        groups = tuple(str(g) for g in user.get("groups") or ())
        for server, model in (user.get("servers") or {}).items():
            if not isinstance(model, Mapping):
                continue
            started = parse_time(model.get("started"))
            if started is None:
                continue
            state = model.get("state") or {}
            if not isinstance(state, Mapping):
                state = {}
            slots = tuple(s for s in state.get("slots") or () if isinstance(s, Mapping) and s.get("uuid"))
            backend = str(state.get("backend") or "")
            gpus: dict[str, int] = {}
            for slot in slots:
                gpus[str(slot.get("name") or "GPU")] = gpus.get(str(slot.get("name") or "GPU"), 0) + 1
            if backend == "runpod":
                inner = state.get("backend_state")
                inner = inner if isinstance(inner, Mapping) else {}

                def pick(key: str, inner: Mapping[str, Any] = inner, state: Mapping[str, Any] = state) -> Any:
                    return state[key] if state.get(key) is not None else inner.get(key)

                usd = max(0.0, _number(pick("price_per_hour_usd")) or 0.0)
                count = _number(pick("gpu_count"))
                gpu_type = pick("gpu_type_id") or pick("gpu_type")
                if not gpus and gpu_type:
                    gpus = {str(gpu_type): int(count) if count is not None and count >= 0 else 1}
                utilisation = _number(pick("gpu_utilization_percent"))
            else:
                usd = sum(prices.price(str(s.get("name") or "")) for s in slots)
                utilisation = None
            runs.append(
                ServerRun(
                    user=name,
                    server=str(server),
                    groups=groups,
                    run=str(model.get("started")),
                    started=started,
                    ready=bool(model.get("ready")),
                    profile=str(state.get("profile") or (model.get("user_options") or {}).get("profile") or ""),
                    backend=backend,
                    host=str(state.get("host") or ""),
                    slots=slots,
                    gpus={k: v for k, v in gpus.items() if v > 0},
                    usd_per_hour=usd,
                    gpu_utilization_percent=utilisation,
                    pending=str(model.get("pending") or ""),
                )
            )
    return runs
