"""Hub-side time of a RunPod spawn: what DO-LAB adds beyond the pod's own start (target: median <= 1 s).

A real hub (tests/e2e/hub.py: the shipped jupyterhub_config.py plus an overlay, real proxy, loopback ports) with
one ``backend: runpod`` profile, the RunPod emulator (tests/runpod_emulator) running pods as containers on the
test stack's engine 1, and the shipped RunPodBackend settings (poll intervals, retries) except the proxy URL
template. The emulator's simulated boot (``--boot-seconds``, default 2) stands for RunPod scheduling the pod and
pulling its image.

Per spawn (one warm-up spawn first, not counted), with wall-clock times:

- ``t0``: ``POST /hub/api/users/<u>/server`` is sent;
- ``created``: the emulator received ``podFindAndDeployOnDemand`` (the pod exists);
- ``up``: the single-user server in the pod first answers ``GET /user/<u>/api`` at the pod's own published
  port (probed every 20 ms; the simulated boot, the container's start and jupyter-server's start are all before
  it: the pod's own time);
- ``ready``: the hub first says the server is ready (``GET /hub/api/users/<u>`` polled every 50 ms).

``hub side = (ready - t0) - (up - created)``: the time before the pod was asked for (options, GPU prices, the
leftover check, the SDK's extra ``get_gpu`` round trip) plus the time from the server answering to the hub
knowing it (runtime polls with backoff, the hub's own wait for the server, the proxy route). Also printed:
``beyond boot = (ready - t0) - boot seconds``, which counts the container's and jupyter-server's start as well.
It prints numbers and asserts nothing::

    .venv/bin/python bench/runpod_spawn.py [--spawns 10] [--boot-seconds 2] [--json OUT]

Needs the Docker test stack (`.venv/bin/python tests/stack.py up`); exits 2 with a sentence when it is not up.
The hub, its proxy and every pod container are stopped and removed on exit, on an error, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
from _signals import interrupts_as_keyboard_interrupt, uninterrupted  # bench/_signals.py, beside this script

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.e2e.hub import Hub, free_port  # noqa: E402
from tests.e2e.stack import STACK_JSON  # noqa: E402
from tests.runpod_emulator.client import PROXY_URL_TEMPLATE, EmulatorProcess  # noqa: E402

USER = "bench"
PROFILE = {
    "display_name": "RunPod A100",
    "slug": "pod",
    "backend": "runpod",
    "gpus": 1,
    "runpod": {"gpu_types": ["NVIDIA A100 80GB PCIe"], "image": "dolab-singleuser-test:latest"},
}


def load_stack() -> dict[str, Any]:
    try:
        return dict(json.loads(STACK_JSON.read_text()))
    except (OSError, ValueError) as e:
        sys.exit(f"The Docker test stack is not up ({STACK_JSON}: {e}); run `.venv/bin/python tests/stack.py up`.")


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def probe_up(em: EmulatorProcess, deadline: float, found: dict[str, float]) -> None:
    """Record when the pod's server first answers at its own published port."""
    while time.monotonic() < deadline:
        pods = em.pods()
        port = pods[0]["hostPorts"].get("8888") if pods else None
        if port and answers(f"http://127.0.0.1:{port}/user/{USER}/api"):
            found["up"] = time.time()
            found["created"] = pods[0]["createdAt"]
            return
        time.sleep(0.02)


def spawn_once(hub: Hub, em: EmulatorProcess, timeout: float = 180) -> dict[str, float]:
    found: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    prober = threading.Thread(target=probe_up, args=(em, deadline, found), daemon=True)
    t0 = time.time()
    prober.start()
    reply = hub.start_server(USER, {"profile": "pod"})
    if reply.status_code not in (201, 202):
        raise RuntimeError(f"spawn refused: {reply.status_code} {reply.text}")
    while time.monotonic() < deadline:
        if hub.user(USER).get("servers", {}).get("", {}).get("ready"):
            found["ready"] = time.time()
            break
        time.sleep(0.05)
    prober.join(max(0.0, deadline - time.monotonic()))
    if {"ready", "up", "created"} - set(found):
        raise RuntimeError(f"spawn did not finish in {timeout} s: {found}\n{hub.log_tail()}")
    found["t0"] = t0
    return found


def stop(hub: Hub, em: EmulatorProcess) -> None:
    hub.stop_server(USER)
    deadline = time.monotonic() + 60
    while em.pods() and time.monotonic() < deadline:
        time.sleep(0.1)
    if em.pods():
        raise RuntimeError("the pod was not terminated after the stop")


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spawns", type=int, default=10, help="counted spawns (default 10)")
    parser.add_argument("--boot-seconds", type=float, default=2.0, help="the emulator's simulated boot")
    parser.add_argument("--json", type=Path, help="write the samples and summaries here")
    args = parser.parse_args()
    stack = load_stack()
    root = Path(tempfile.mkdtemp(prefix="dolab-bench-runpod-"))
    em: EmulatorProcess | None = None
    hub: Hub | None = None
    samples: list[dict[str, float]] = []
    with interrupts_as_keyboard_interrupt():
        try:
            em = EmulatorProcess(
                free_port(), secrets.token_hex(16), root / "emulator.log", docker_host=stack["docker_host"]
            )
            hub_port = free_port()
            overlay = f"""
c.DoLabSpawner.profile_list = {[PROFILE]!r}
c.RunPodBackend.hub_connect_url = "http://{stack["bridge_ip"]}:{hub_port}"
c.RunPodBackend.proxy_url_template = {PROXY_URL_TEMPLATE!r}
"""
            env = {
                "DOLAB_HUB_IP": "0.0.0.0",
                "DOLAB_HUB_PORT": str(hub_port),
                "RUNPOD_API_BASE_URL": em.url,
                "RUNPOD_API_KEY": em.api_key,
                "DOLAB_RUNPOD_REAPER": "0",
            }
            hub = Hub(root / "hub", overlay=overlay, env=env).start()
            hub.create_user(USER)
            em.faults(boot_seconds=args.boot_seconds)
            for i in range(args.spawns + 1):
                sample = spawn_once(hub, em)
                stop(hub, em)
                total = sample["ready"] - sample["t0"]
                pod_side = sample["up"] - sample["created"]
                row = {
                    "total": total,
                    "before_create": sample["created"] - sample["t0"],
                    "pod_side": pod_side,
                    "after_up": sample["ready"] - sample["up"],
                    "hub_side": total - pod_side,
                    "beyond_boot": total - args.boot_seconds,
                }
                label = "warm-up" if i == 0 else f"spawn {i}"
                print(
                    f"{label:>9}: total {total:6.3f} s, pod's own start {pod_side:6.3f} s, hub side "
                    f"{row['hub_side']:6.3f} s (before the create {row['before_create']:.3f}, after the server "
                    f"answered {row['after_up']:.3f})",
                    flush=True,
                )
                if i:
                    samples.append(row)
        except KeyboardInterrupt:
            print("interrupted; cleaning up", file=sys.stderr)
            return 130
        finally:
            with uninterrupted():
                if hub is not None:
                    hub.shutdown()
                if em is not None:
                    em.stop()
    keys = ["total", "pod_side", "hub_side", "before_create", "after_up", "beyond_boot"]
    summaries = {k: summary([s[k] for s in samples]) for k in keys}
    print(f"\nRunPod spawn, {len(samples)} spawns, simulated boot {args.boot_seconds:g} s (seconds):")
    print(f"{'measure':<14} {'median':>8} {'min':>8} {'max':>8}")
    for key in keys:
        s = summaries[key]
        print(f"{key:<14} {s['median']:>8.3f} {s['min']:>8.3f} {s['max']:>8.3f}")
    verdict = "meets" if summaries["hub_side"]["median"] <= 1.0 else "misses"
    print(f"\nhub side, median: {summaries['hub_side']['median']:.3f} s ({verdict} the target of 1 s or less)")
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "summary": summaries}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
