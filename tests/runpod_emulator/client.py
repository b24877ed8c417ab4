"""Start the RunPod emulator as a subprocess and drive its control API (used by fixtures and the benchmark)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from tests.patience import patience

REPO = Path(__file__).resolve().parents[2]

#: A pod's HTTP port as the emulator publishes it (``runtime.ports[].ip`` and ``publicPort``).
PROXY_URL_TEMPLATE = "http://{ip}:{public_port}"


class EmulatorProcess:
    """One emulator subprocess on a loopback port, and its control API."""

    def __init__(
        self, port: int, api_key: str, log_path: Path, docker_host: str | None = None, instance: str = "dolab-test"
    ) -> None:
        self.port = port
        self.api_key = api_key
        self.instance = instance
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "tests.runpod_emulator", "--port", str(port), "--instance", instance]
        cmd += ["--docker-host", docker_host] if docker_host else ["--no-docker"]
        env = {**os.environ, "RUNPOD_EMULATOR_API_KEY": api_key}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_up()

    def _wait_up(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + patience(timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the RunPod emulator exited:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/_emulator/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the RunPod emulator did not answer:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The end of the emulator's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _post(self, what: str, body: Any = None) -> None:
        requests.post(f"{self.url}/_emulator/{what}", json=body or {}, timeout=60).raise_for_status()

    def faults(self, **faults: Any) -> None:
        """Set faults: ``no_capacity=[[gpu_id, "SECURE"|"COMMUNITY"], ...]``, ``boot_seconds=s``,
        ``resume_fails=True``, ``replies=[{"field": "pod", "times": 2, "status": 429, "body": "...",
        "content_type": "text/html", "delay_seconds": 0}]`` (the next matching requests get that reply)."""
        self._post("faults", faults)

    def prices(self, prices: dict[str, dict[str, float]]) -> None:
        """Change GPU prices: ``{gpu_id: {"securePrice": x, "communityPrice": y}}``."""
        self._post("prices", prices)

    def reset(self) -> None:
        """No faults, default prices, an empty request log (pods stay)."""
        self._post("reset")

    def requests(self) -> list[dict[str, Any]]:
        """Every GraphQL request since the last reset: ``fields`` (top-level), ``query``, ``status``."""
        return requests.get(f"{self.url}/_emulator/requests", timeout=30).json()["requests"]

    def fields_asked(self) -> list[str]:
        """The top-level fields of every request since the last reset, in order."""
        return [f for r in self.requests() for f in r["fields"]]

    def pods(self) -> list[dict[str, Any]]:
        """Every pod, with its container id, host ports and env as a dict."""
        return requests.get(f"{self.url}/_emulator/pods", timeout=30).json()["pods"]

    def vanish(self, pod_id: str) -> None:
        """Make a pod disappear (its container too)."""
        self._post("vanish", {"pod_id": pod_id})

    def remove_all(self) -> None:
        """Terminate every pod."""
        self._post("remove-all")

    def stop(self) -> None:
        """Stop the emulator; it removes its containers on the way out."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
