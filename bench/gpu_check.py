"""Check GPU pinning on a machine with NVIDIA GPUs: does a server see exactly the GPU DO-LAB gives it?

For each GPU NVML lists (and for a CPU-only server), start a child Python with the variables DoLabSpawner
would set, and ask PyTorch in the child what it sees: one GPU with the right UUID (none for CPU). Prints
PASS/FAIL lines; exits 1 on any FAIL, 0 when all pass or when there is no NVIDIA GPU.

Needs only Python, nvidia-ml-py and PyTorch, not JupyterHub: the GPU inventory comes from ``dolab_core.gpus``,
which imports nothing else. Run: ``python bench/gpu_check.py``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT_SECONDS = 180

# Runs in the child: what CUDA shows a process started with the pinning variables.
CHILD = r"""
import json
import torch

seen = {"count": torch.cuda.device_count(), "name": None, "uuid": None}
if seen["count"]:
    props = torch.cuda.get_device_properties(0)
    seen["name"] = torch.cuda.get_device_name(0)
    if getattr(props, "uuid", None) is not None:
        seen["uuid"] = str(props.uuid)
    elif hasattr(props, "pci_bus_id"):
        # Older PyTorch: find CUDA device 0 in NVML by its PCI address (NVML ignores CUDA_VISIBLE_DEVICES).
        import pynvml
        pynvml.nvmlInit()
        bus = "%08x:%02x:%02x.0" % (props.pci_domain_id, props.pci_bus_id, props.pci_device_id)
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByPciBusId(bus))
        seen["uuid"] = uuid.decode() if isinstance(uuid, bytes) else uuid
print(json.dumps(seen))
"""


def load_slots() -> Any:
    """``dolab_core.gpus`` (stdlib only) from this checkout, whether or not DO-LAB is installed."""
    sys.path.insert(0, str(REPO))
    try:
        return importlib.import_module("dolab_core.gpus")
    finally:
        sys.path.remove(str(REPO))


def pinning_env(slots: list[Any]) -> dict[str, str]:
    """The variables that pin a server to ``slots``: a mirror of
    ``dolab_spawner.backends.base.gpu_environment``, which cannot be imported without JupyterHub.

    Its rules: no slots -> an empty CUDA_VISIBLE_DEVICES (CUDA sees no GPU) and NVIDIA_VISIBLE_DEVICES=void
    (the container runtime injects none); else each GPU by UUID (by index only when it has no GPU-/MIG- UUID)
    in both variables, with CUDA_DEVICE_ORDER=PCI_BUS_ID so indices mean what NVML means; DOLAB_GPUS names
    the models. :func:`check_mirror` compares the two where JupyterHub is importable.
    """
    if not slots:
        return {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void", "DOLAB_GPUS": ""}
    ids = ",".join(s.uuid if s.uuid.startswith(("GPU-", "MIG-")) else str(s.index) for s in slots)
    return {
        "CUDA_VISIBLE_DEVICES": ids,
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "NVIDIA_VISIBLE_DEVICES": ids,
        "DOLAB_GPUS": ",".join(s.name for s in slots),
    }


def check_mirror(slots_module: Any) -> bool | None:
    """Whether :func:`pinning_env` still matches the real function; None where JupyterHub is missing."""
    sys.path.insert(0, str(REPO))
    try:
        from dolab_spawner.backends.base import gpu_environment
    except Exception as e:  # ImportError without JupyterHub; anything else is reported the same way
        print(f"SKIP pinning_env() not compared with gpu_environment(): {type(e).__name__}: {e}")
        return None
    finally:
        sys.path.remove(str(REPO))
    gpu = slots_module.GpuSlot
    samples = [
        [],
        [gpu(0, "GPU-1234", "NVIDIA H100 80GB HBM3", 80)],
        [gpu(3, "local-3", "A10", 24), gpu(1, "MIG-9", "A100", 10)],
    ]
    return all(gpu_environment(sample) == pinning_env(sample) for sample in samples)


def same_uuid(a: str | None, b: str) -> bool:
    """NVML says ``GPU-xxxxxxxx-...``, PyTorch ``xxxxxxxx-...``: compare without the prefix and case."""
    if not a:
        return False
    return a.lower().removeprefix("gpu-") == b.lower().removeprefix("gpu-")


def run_child(env: dict[str, str]) -> dict[str, Any]:
    """What a child started with ``env`` (over this environment) sees; ``error`` when it could not say."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no answer in {CHILD_TIMEOUT_SECONDS} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    """Print the inventory, check each GPU and the CPU case, and return the exit code."""
    slots_module = load_slots()
    results: list[bool] = []
    mirror = check_mirror(slots_module)
    if mirror is not None:
        print(f"{'PASS' if mirror else 'FAIL'} pinning_env() matches dolab_spawner.backends.base.gpu_environment()")
        results.append(mirror)
    inventory = slots_module.read_nvml_inventory()
    if not inventory:
        print("no NVIDIA GPU found, nothing to check")
        return 0 if all(results) else 1

    print(f"{'index':<6}{'uuid':<42}{'memory':>9}  name")
    for slot in inventory:
        print(f"{slot.index:<6}{slot.uuid:<42}{slot.memory_gb:>6g} GB  {slot.name}")
    print()

    for slot in [*inventory, None]:
        label = f"GPU {slot.index} ({slot.name})" if slot else "CPU only"
        env = pinning_env([slot] if slot else [])
        seen = run_child(env)
        if "error" in seen:
            ok, detail = False, f"the child failed: {seen['error']}"
        elif slot is None:
            ok, detail = seen["count"] == 0, f"the child saw {seen['count']} GPU(s), wanted 0"
        else:
            ok = seen["count"] == 1 and same_uuid(seen["uuid"], slot.uuid)
            detail = (
                f"the child saw {seen['count']} GPU(s), device 0 = {seen['name']} {seen['uuid'] or '(UUID unknown)'};"
                f" wanted 1, {slot.uuid}"
            )
        pins = " ".join(f"{k}={v}" for k, v in env.items() if k.endswith("VISIBLE_DEVICES"))
        print(f"{'PASS' if ok else 'FAIL'} {label}: {detail} [{pins}]")
        results.append(ok)

    failed = results.count(False)
    print(f"\n{len(results) - failed} of {len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
