"""End to end: a hub on the shipped config, with every DO-LAB service it manages, stops fast and cleanly.

Ctrl-C in a terminal (SIGINT) and an admin's or systemd's stop (SIGTERM) go to the hub only: its managed services
run in sessions of their own, and the hub stops them one after the other (SIGINT, then up to 30 s later SIGTERM).
Each service must exit at once, so the hub and every process it started are gone within seconds, and nothing in
the output may be a traceback.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.patience import patience
from tests.runpod_emulator.client import EmulatorProcess

from .hub import Hub, free_port
from .stack import docker_stack

pytestmark = pytest.mark.e2e

#: How long the hub and everything it started may take to be gone after the signal (seconds).
GONE_WITHIN_SECONDS = 5
#: A line each service logs once it runs: the culler, the monitor, dolab-sync, and the Docker and RunPod reapers.
STARTED = ("Sweeping every", "Sampling every", "Backing up to", "Sweeping hub", "Sweeping RunPod pods")


def children(pid: int) -> dict[int, str]:
    """The processes below ``pid`` (from /proc), with their command lines."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = commands.get(child, "")
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: only its exit status is left to collect)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def started() -> Iterator[dict[int, str]]:
    """The processes the hub started (filled by the test); any still running at the end is killed."""
    processes: dict[int, str] = {}
    yield processes
    for pid in processes:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    stack = docker_stack()
    profiles = [
        {"display_name": "CPU", "slug": "cpu", "default": True},
        {"display_name": "Docker CPU", "slug": "docker-cpu", "backend": "docker"},
        {
            "display_name": "RunPod A100",
            "slug": "runpod-a100",
            "backend": "runpod",
            "gpus": 1,
            "runpod": {"gpu_types": ["NVIDIA A100 80GB PCIe"], "image": "dolab-singleuser-test:latest"},
        },
    ]
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens: the sync service needs no store to idle
    # RunPod as the record-only emulator (no engine): the hub's and the reaper's calls get their answers.
    runpod = EmulatorProcess(free_port(), secrets.token_hex(16), tmp_path / "runpod.log", instance="dolab-shutdown")
    env = {
        "DOLAB_PROFILES": json.dumps(profiles),
        "DOLAB_DOCKER_HOSTS": json.dumps([{"name": "local", "url": stack.docker_host}]),
        "DOLAB_REAPER_INTERVAL": "1",
        "DOLAB_RUNPOD_REAPER_INTERVAL": "1",
        "RUNPOD_API_KEY": runpod.api_key,
        "RUNPOD_API_BASE_URL": runpod.url,
        "DOLAB_SYNC_S3_BUCKET": "dolab-shutdown-test",
        "DOLAB_SYNC_S3_ENDPOINT": nowhere,
        "DOLAB_SYNC_S3_ACCESS_KEY_ID": "key",
        "DOLAB_SYNC_S3_SECRET_ACCESS_KEY": "secret",
        "DOLAB_SYNC_PORT": str(free_port()),
        "DOLAB_CULLER_INTERVAL": "1",
        "DOLAB_MONITOR_INTERVAL": "1",
    }
    try:
        hub = Hub(tmp_path, env=env).start(timeout=180)
        yield hub
        hub.shutdown()
    finally:
        runpod.stop()


def wait_for_services(hub: Hub, timeout: float = 180) -> dict[int, str]:
    """Every service process, once each has said it runs (and its page listens)."""
    assert hub.proc is not None
    deadline = time.monotonic() + patience(timeout)
    while time.monotonic() < deadline:
        log = hub.log_path.read_text(errors="replace")
        running = children(hub.proc.pid)
        missing = [line for line in STARTED if line not in log]
        services = [command for command in running.values() if " -m dolab_services." in command]
        if not missing and len(services) == len(STARTED) and log.count("(listening on ") >= 3:
            time.sleep(1)  # each is in its loop now
            return children(hub.proc.pid)
        time.sleep(0.5)
    raise TimeoutError(f"the services did not all start (no {missing}):\n{hub.log_tail()}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_hub_and_its_services_stop_fast_and_cleanly(
    hub: Hub, started: dict[int, str], signum: signal.Signals
) -> None:
    assert hub.proc is not None
    processes = wait_for_services(hub)
    started.update(processes)
    assert processes, "the hub started no process"
    began = time.monotonic()
    hub.proc.send_signal(signum)
    gone_after: dict[str, float] = {}
    while time.monotonic() < began + GONE_WITHIN_SECONDS + 60:  # a generous poll: the time is measured, then asserted
        now = time.monotonic() - began
        if hub.proc.poll() is not None:
            gone_after.setdefault(f"the hub ({hub.proc.pid})", now)
        for pid, command in processes.items():
            if not alive(pid):
                gone_after.setdefault(f"{command[:100]} ({pid})", now)
        if len(gone_after) == len(processes) + 1:
            break
        time.sleep(0.05)
    took = time.monotonic() - began
    left = {pid: command for pid, command in processes.items() if alive(pid)}
    log = hub.log_path.read_text(errors="replace")
    tail = "\n".join(log.splitlines()[-80:])
    assert hub.proc.returncode is not None and not left, f"still running after {took:.1f} s: {left}\n{tail}"
    when = "\n".join(f"{seconds:5.2f} s  {what}" for what, seconds in sorted(gone_after.items(), key=lambda i: i[1]))
    assert took < GONE_WITHIN_SECONDS, f"the hub and its services took {took:.1f} s to stop:\n{when}\n{tail}"
    assert "Traceback" not in log, f"a traceback in the output:\n{log[log.index('Traceback') - 2000 :]}"
