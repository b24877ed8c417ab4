"""The running servers as the monitor sees them, read from the hub's user models (with spawner state).

The spawner state DO-LAB's spawner saves (``admin:server_state``), read through
:class:`~dolab_core.serverstate.ServerState`, says what each server holds: ``profile``, ``backend`` (``local``,
``docker``, ``runpod``), ``host`` and ``slots`` (the GPU slot dicts: ``uuid``, ``index``, ``name``, ``host``).
The profile is the one the spawner validated, never the user-written ``user_options``. For RunPod pods:

- ``price_per_hour_usd``: what the whole pod costs per hour (missing: 0);
- ``gpu_type`` and ``gpu_count``: the pod's GPUs when it has no slots (no type: no GPU-hours are counted; no
  count: one);
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

from dolab_core.serverstate import ServerState
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
            if started is not None:
                runs.append(_server_run(name, str(server), groups, model, started, prices))
    return runs


def _server_run(
    user: str, server: str, groups: tuple[str, ...], model: Mapping[str, Any], started: datetime, prices: GpuPrices
) -> ServerRun:
    """One started server: what its spawner state (:class:`ServerState`) says it holds, and what that costs."""
    state = ServerState.of(model)
    slots = tuple(s for s in state.slots if s.get("uuid"))
    gpus: dict[str, int] = {}
    for slot in slots:
        gpus[str(slot.get("name") or "GPU")] = gpus.get(str(slot.get("name") or "GPU"), 0) + 1
    if state.backend == "runpod":
        usd = max(0.0, state.price_per_hour_usd or 0.0)
        if not gpus and state.gpu_type:
            gpus = {state.gpu_type: state.gpu_count or 1}  # a pod that does not say how many GPUs rents one
        utilisation = state.gpu_utilization_percent
    else:
        usd = sum(prices.price(str(s.get("name") or "")) for s in slots)
        utilisation = None
    return ServerRun(
        user=user,
        server=server,
        groups=groups,
        run=str(model.get("started")),
        started=started,
        ready=bool(model.get("ready")),
        profile=state.profile,
        backend=state.backend,
        # A state without a DO-LAB server (another spawner's) has no host.
        host=state.host if state.backend else "",
        slots=slots,
        gpus={k: v for k, v in gpus.items() if v > 0},
        usd_per_hour=usd,
        gpu_utilization_percent=utilisation,
        pending=str(model.get("pending") or ""),
    )
