"""What the ``dolab`` command's tests share: a clean environment, GPUs to list, and a URL where nothing listens.
The hub they talk to is :mod:`tests.hub_double`'s.

Each test module wraps these in its own fixtures (``clean_env``, ``hub``, ``closed_url``), so that importing
them needs no fixture re-export.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from dolab_core.gpus import GpuSlot

A100_0 = GpuSlot(0, "GPU-aaaa", "NVIDIA A100-SXM4-80GB", 80.0)
A100_1 = GpuSlot(1, "GPU-bbbb", "NVIDIA A100-SXM4-80GB", 80.0)
REMOTE = GpuSlot(0, "GPU-cccc", "NVIDIA H100 80GB HBM3", 79.6, host="node2")
INVENTORY = [A100_0, A100_1]
INVENTORY_JSON = json.dumps([s.to_dict() for s in INVENTORY])


def isolate_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No DO-LAB, hub, RunPod or proxy variables from the outside; a private data dir; no docker engine."""
    for name in list(os.environ):
        if name.startswith(("DOLAB_", "RUNPOD_", "JUPYTERHUB_")) or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("DOLAB_DATA_DIR", str(data_dir))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    return data_dir


def unused_url() -> str:
    """A 127.0.0.1 URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
