"""Tests for :mod:`dolab_services.app`: a service stops at once, quietly, at SIGINT or SIGTERM.

Each test runs a small ServiceApp as its own process (as the hub runs its services) whose work is stuck where
services get stuck: a call in a worker thread, a clean-up that does not end.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROGRAM = """
import asyncio, sys, time
from dolab_services.app import ServiceApp

class Stuck(ServiceApp):
    name = "stuck"

    def start(self):
        self.run_until_stopped(self.main)

    async def main(self):
        try:
            async def work():
                print("working", flush=True)
                await asyncio.to_thread(time.sleep, 60)  # a call no signal can interrupt
            await self.repeat(work, 1, "round")
            return 0
        finally:
            print("cleaning up", flush=True)
            if {stuck_cleanup!r}:
                await asyncio.sleep(60)

Stuck.launch_instance(sys.argv[1:])
"""


def start(tmp_path: Path, stuck_cleanup: bool = False) -> subprocess.Popen[str]:
    program = tmp_path / "stuck.py"
    program.write_text(PROGRAM.format(stuck_cleanup=stuck_cleanup))
    proc = subprocess.Popen(
        [sys.executable, str(program)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "working"
    return proc


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stuck_cleanup", [False, True], ids=["cleanup", "stuck-cleanup"])
def test_a_signal_ends_the_service_at_once_and_quietly(
    tmp_path: Path, signum: signal.Signals, stuck_cleanup: bool
) -> None:
    proc = start(tmp_path, stuck_cleanup)
    began = time.monotonic()
    proc.send_signal(signum)
    try:
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    took = time.monotonic() - began
    assert proc.returncode == 0, output
    assert took < 2, f"the service took {took:.1f} s to stop:\n{output}"
    assert "cleaning up" in output, "the work's clean-up ran"
    assert f"Stopped ({signum.name})" in output
    assert "Traceback" not in output, output


def test_a_signal_while_starting_ends_it_quietly(tmp_path: Path) -> None:
    program = tmp_path / "starting.py"
    program.write_text(
        "import sys, time\n"
        "from dolab_services.app import ServiceApp\n"
        "class Starting(ServiceApp):\n"
        "    def start(self):\n"
        "        print('starting', flush=True)\n"
        "        time.sleep(60)\n"
        "Starting.launch_instance([])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(program)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "starting"
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in output, output
