"""Unit tests for dolab_spawner.backends.docker_hosts: the GPUs of the other Docker engines."""

from __future__ import annotations

from dolab_core.gpus import GpuSlot
from dolab_spawner.backends.docker_hosts import remote_slots

GPU = {"index": 0, "uuid": "GPU-r-0", "name": "NVIDIA A100 80GB", "memory_gb": 80}


def test_remote_slots_belong_to_their_engine() -> None:
    hosts = [{"name": "local", "gpu_inventory": [GPU]}, {"name": "gpu-2", "gpu_inventory": [GPU]}]
    assert remote_slots(hosts) == [GpuSlot(0, "GPU-r-0", "NVIDIA A100 80GB", 80, host="gpu-2")]
