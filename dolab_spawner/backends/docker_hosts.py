"""Reading ``DoLabSpawner.docker_hosts`` entries, without docker-py: their GPUs, one entry by name, its workspace.

The spawner reads the other machines' GPUs here for its slot pool; the docker backend reads the entry it runs on.
The entries are checked once, at config time, by :func:`dolab_core.engines.docker.check_docker_hosts`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dolab_core.gpus import LOCAL_HOST, GpuSlot

__all__ = ["host_entry", "remote_slots", "workspace_kind"]


def remote_slots(hosts: Sequence[Mapping[str, Any]]) -> list[GpuSlot]:
    """The GPUs of the engines on other machines (the hub's own machine reads NVML or ``gpu_inventory``)."""
    return [
        GpuSlot.from_dict({**gpu, "host": host["name"]})
        for host in hosts
        if host["name"] != LOCAL_HOST
        for gpu in host.get("gpu_inventory", [])
    ]


def host_entry(hosts: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
    """The entry called ``name`` (``{"name": name}`` when there is none: a server from an older config)."""
    return dict(next((h for h in hosts if h["name"] == name), {"name": name}))


def workspace_kind(host: Mapping[str, Any]) -> str:
    """``bind`` (a folder of the engine's machine) or ``volume`` (a named volume): the entry's ``workspace``, by
    default a folder on this machine's engine and a volume elsewhere."""
    default = "bind" if host.get("name", LOCAL_HOST) == LOCAL_HOST else "volume"
    return str(host.get("workspace", default))
