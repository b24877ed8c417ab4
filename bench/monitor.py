"""The monitor at size: CPU time per sampling tick with 8 GPUs and 500 running servers, the dashboard API's latency,
and the service's memory.

One real hub (JupyterHub subprocess, the real configurable-http-proxy, loopback ports, SQLite in a temporary folder)
whose spawner starts nothing (``BenchMonitorSpawner``, written into the temporary folder: every server is the one
shared stub of bench/culler_sweep.py). Its spawner state carries what DO-LAB's spawner stores: the first 8 servers
hold one local A100 slot each (GPUs ``GPU-bench-0`` .. ``-7``), every tenth other server is a RunPod pod at 2 USD/h
(``price_per_hour_usd``, one RTX 4090), the rest are CPU servers. The hub starts ``python -m dolab_services.monitor``
as a managed service with the monitor's own role, a tick every ``--interval`` seconds, GPU readings of the 8 GPUs from
a telemetry file, a default quota for everyone (so every metered user's quota is evaluated each tick) and the ledger
in SQLite. Users are created and their servers started through the REST API.

Measured, once all servers run and the ledger has booked them (the first ticks are not counted):

- ``tick CPU`` / ``tick wall``: the monitor's own ``dolab_monitor_tick_cpu_seconds`` and ``dolab_monitor_tick_seconds``
  after each of ``--ticks`` ticks (CPU: ``time.process_time`` of the service process across the tick: the hub
  listing, the telemetry read, the ledger booking in its thread, quota checks and metrics);
- ``API latency``: ``--requests`` sequential ``GET api/overview`` (the admin's view: every GPU and server, totals)
  and ``GET api/usage?user=u0000`` (a GPU user's page data), through the proxy with an admin user's token;
- ``RSS``: the service's ``process_resident_memory_bytes`` (target: under 200 MB at 500 servers).

Prints the numbers; it asserts nothing::

    .venv/bin/python bench/monitor.py [--users 500] [--interval 5] [--ticks 10] [--requests 30]

``--gpu-check`` is the device check for a machine with NVIDIA GPUs instead (no hub): it prints what the NVML
source reads of every GPU, starts a process that keeps GPU 0 busy (PyTorch, pinned to that GPU by UUID the way
DO-LAB pins a server), and checks that the monitor's view attributes that process to the server holding GPU 0's
slot and to no other GPU; exit status 0 when it does, 1 when not, 2 without NVML or PyTorch.

Needs psutil (``pip install -e '.[bench]'``) and configurable-http-proxy; exits 2 with a sentence when one is
missing. The hub, its services, the stub and the temporary folder are removed on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
from _signals import interrupts_as_keyboard_interrupt, uninterrupted  # bench/_signals.py, beside this script
from culler_sweep import (  # bench/culler_sweep.py: the shared stub, the users and their servers
    ADMIN,
    HUB_CONFIG,
    Bench,
    BenchFailed,
    free_port,
    populate,
    progress,
)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from dolab_services.monitor.registration import MONITOR_SCOPES  # noqa: E402
from dolab_services.scopes import ADMIN_ROLE, CUSTOM_SCOPES  # noqa: E402

MONITOR = "dolab-monitor"
GPUS = 8
ADMIN_USER = "bench-admin-user"

SPAWNER_MODULE = '''\
"""Written by bench/monitor.py: a spawner that starts nothing; its state says what a DO-LAB server holds."""

from jupyterhub.spawner import Spawner
from jupyterhub.utils import url_path_join
from traitlets import Unicode


class BenchMonitorSpawner(Spawner):
    stub_url = Unicode("", config=True, help="The shared stub server every spawn returns.")

    async def start(self):
        return self.stub_url

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None

    def get_state(self):
        state = super().get_state()
        if self.server is None:
            return state
        index = int(self.user.name[1:]) if self.user.name[1:].isdigit() else -1
        state.update(server_url=url_path_join(self.stub_url, self.server.base_url), profile="cpu", backend="local",
                     host="local", slots=[])
        if 0 <= index < GPUS:
            state.update(profile="a100", slots=[{"index": index, "uuid": f"GPU-bench-{index}",
                                                  "name": "NVIDIA A100 80GB", "memory_gb": 80, "host": "local"}])
        elif index % 10 == 0:
            state.update(profile="runpod-4090", backend="runpod", host="runpod", price_per_hour_usd=2.0,
                         gpu_type="NVIDIA GeForce RTX 4090", gpu_count=1)
        return state
'''.replace("GPUS", str(GPUS))


def find_proxy() -> list[str]:
    """The configurable-http-proxy command, or SystemExit(2) with a sentence."""
    candidates = [
        REPO / ".dolab" / "node" / "node_modules" / ".bin" / "configurable-http-proxy",
        Path(sys.executable).parent / "configurable-http-proxy",
    ]
    found = next((str(c) for c in candidates if c.exists()), None) or shutil.which("configurable-http-proxy")
    if not found:
        raise SystemExit("monitor bench: configurable-http-proxy is not installed: `make run` installs it")
    return [found]


class MonitorBench(Bench):
    """bench/culler_sweep.py's hub, with the monitor as its managed service and a spawner whose state holds GPUs."""

    monitor_port: int = 0

    def start_hub(self, proxy_command: list[str], spawn_limit: int, timeout: float = 90, interval: float = 5) -> None:
        (self.root / "benchspawner.py").write_text(SPAWNER_MODULE)
        data = self.root / "data"
        data.mkdir()
        gpus = [
            {
                "uuid": f"GPU-bench-{i}",
                "index": i,
                "name": "NVIDIA A100 80GB",
                "utilization_percent": 10 * i,
                "memory_used_gb": 4.0 * i,
                "memory_total_gb": 80,
                "temperature_c": 40 + i,
                "power_w": 100 + 20 * i,
                "processes": [{"pid": 1000 + i, "memory_gb": 4.0 * i}],
            }
            for i in range(GPUS)
        ]
        (self.root / "gpus.json").write_text(json.dumps(gpus))
        (self.root / "quotas.json").write_text(
            json.dumps({"default": {"gpu_hours": {"day": 1000}, "usd": {"month": 1e6}}})
        )
        self.monitor_port = free_port()
        self.hub_url = f"http://127.0.0.1:{free_port()}"
        monitor_service = {
            "name": MONITOR,
            "url": f"http://127.0.0.1:{self.monitor_port}",
            "command": [
                sys.executable,
                "-m",
                "dolab_services.monitor",
                "--interval",
                f"{interval:g}",
                "--telemetry",
                f"file:{self.root / 'gpus.json'}",
                "--quotas-file",
                str(self.root / "quotas.json"),
                "--db-url",
                f"sqlite:///{data / 'monitor.sqlite'}",
            ],
            "oauth_no_confirm": True,
        }
        services = [{"name": ADMIN, "api_token": self.tokens[ADMIN], "display": False}, monitor_service]
        roles = [
            # the bench's service: an admin, so that it can give the admin user of the API timings a token
            {"name": "admin", "services": [ADMIN]},
            {"name": MONITOR, "scopes": list(MONITOR_SCOPES), "services": [MONITOR]},
            # the admin whose token times the API: the overview needs DO-LAB's read-usage scope, not the admin flag
            {"name": ADMIN_ROLE, "scopes": list(CUSTOM_SCOPES), "users": [ADMIN_USER]},
        ]
        config = self.root / "jupyterhub_config.py"
        config.write_text(
            HUB_CONFIG.format(
                bind_url=self.hub_url,
                hub_port=free_port(),
                proxy_command=proxy_command,
                proxy_api_url=f"http://127.0.0.1:{free_port()}",
                proxy_pid=str(data / "proxy.pid"),
                db_url=f"sqlite:///{data / 'jupyterhub.sqlite'}",
                cookie_secret=str(data / "cookie_secret"),
                hub_pid=str(data / "jupyterhub.pid"),
                stub_url=self.stub_url,
                spawn_limit=spawn_limit,
                services=services,
                roles=roles,
            )
            .replace("benchspawner.BenchSpawner", "benchspawner.BenchMonitorSpawner")
            .replace("c.BenchSpawner.", "c.BenchMonitorSpawner.")
            + f"c.JupyterHub.custom_scopes = {CUSTOM_SCOPES!r}\n"
        )
        self._launch(config, timeout)

    def _launch(self, config: Path, timeout: float) -> None:
        import subprocess

        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "DOLAB_"))}
        env["PYTHONPATH"] = os.pathsep.join([str(self.root), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the hub keeps writing to it
        self.hub = subprocess.Popen(
            [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(config)],
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.session.headers["Authorization"] = f"token {self.tokens[ADMIN]}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.hub.poll() is not None:
                raise BenchFailed(f"the hub exited with {self.hub.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.api_url}/", timeout=2).status_code == 200:
                    self.children = self.psutil.Process(self.hub.pid).children(recursive=True)
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise BenchFailed(f"the hub did not answer in {timeout:g} s:\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        """The monitor's metrics (unlabelled samples by name; labelled ones summed), read at its own address."""
        text = requests.get(f"http://127.0.0.1:{self.monitor_port}/services/{MONITOR}/metrics", timeout=10).text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
        return values


def wait_for_ticks(bench: MonitorBench, servers: int, timeout: float = 300) -> None:
    """Until the monitor has seen every server and ticked twice more (the first bookings of each run are done)."""
    deadline = time.monotonic() + timeout
    seen_at: float | None = None
    while time.monotonic() < deadline:
        try:
            m = bench.metrics()
        except requests.RequestException:
            time.sleep(1)
            continue
        ticks = m.get("dolab_monitor_ticks_total", 0)
        if m.get("dolab_servers_running", 0) >= servers:
            if seen_at is None:
                seen_at = ticks
            elif ticks >= seen_at + 2:
                return
        time.sleep(0.5)
    raise BenchFailed(f"the monitor did not see {servers} servers in {timeout:g} s:\n{bench.log_tail()}")


def measure_ticks(bench: MonitorBench, ticks: int, interval: float) -> list[tuple[float, float]]:
    """``(tick CPU s, tick wall s)`` of the next ``ticks`` ticks."""
    results = []
    last = bench.metrics().get("dolab_monitor_ticks_total", 0)
    deadline = time.monotonic() + ticks * (interval + 30)
    while len(results) < ticks and time.monotonic() < deadline:
        time.sleep(min(1.0, interval / 4))
        m = bench.metrics()
        count = m.get("dolab_monitor_ticks_total", 0)
        if count > last:
            last = count
            results.append((m["dolab_monitor_tick_cpu_seconds"], m["dolab_monitor_tick_seconds"]))
            progress(f"  tick: {results[-1][0] * 1000:.1f} ms CPU, {results[-1][1] * 1000:.1f} ms wall")
    return results


def latency(session: requests.Session, url: str, count: int) -> tuple[list[float], int]:
    """Seconds per sequential GET of ``url`` (after one warm-up), and the size of the answer."""
    session.get(url, timeout=60).raise_for_status()
    times, size = [], 0
    for _ in range(count):
        t0 = time.perf_counter()
        reply = session.get(url, timeout=60)
        times.append(time.perf_counter() - t0)
        reply.raise_for_status()
        size = len(reply.content)
    return times, size


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    median = statistics.median(ordered)
    return f"median {median * 1000:8.1f} ms   p95 {p95 * 1000:8.1f} ms   max {ordered[-1] * 1000:8.1f} ms"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=500, help="running servers (one per user)")
    parser.add_argument("--interval", type=float, default=5, help="the monitor's tick interval (s)")
    parser.add_argument("--ticks", type=int, default=10, help="ticks measured")
    parser.add_argument("--requests", type=int, default=30, help="API requests measured per endpoint")
    parser.add_argument("--spawn-concurrency", type=int, default=20, help="server starts in flight at once")
    parser.add_argument("--gpu-check", action="store_true", help="the device check on a GPU machine (no hub)")
    return parser.parse_args(argv)


GPU_CHILD = """
import sys, time, torch
a = torch.randn(4096, 4096, device="cuda:0")
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
"""


async def gpu_check() -> int:
    """Real NVML readings, and a process on GPU 0 attributed to the slot's holder (see the module docstring)."""
    import asyncio
    import subprocess
    from datetime import datetime, timezone

    from dolab_services.hubclient import HubClient
    from dolab_services.monitor.enforcer import QuotaEnforcer
    from dolab_services.monitor.ledger import AsyncLedger, UsageLedger
    from dolab_services.monitor.runs import GpuPrices, server_runs
    from dolab_services.monitor.sampler import Monitor
    from dolab_services.monitor.telemetry import NvmlSource
    from dolab_services.stop import StopPath

    source = NvmlSource(timeout_seconds=30)
    readings = await source.read()
    if not readings:
        print("gpu check: NVML gives no GPU readings here (see the warning above)", file=sys.stderr)
        return 2
    print(f"{'idx':>3} {'uuid':<42} {'name':<28} {'use%':>5} {'mem GB':>13} {'temp':>5} {'W':>6} procs")
    for r in readings:
        memory = f"{r.memory_used_gb or 0:.1f}/{r.memory_total_gb or 0:.0f}"
        print(
            f"{r.index!s:>3} {r.uuid:<42} {r.name[:28]:<28} {r.utilization_percent!s:>5} {memory:>13}"
            f" {r.temperature_c!s:>5} {r.power_w!s:>6} {len(r.processes)}"
        )
    gpu0 = min(readings, key=lambda r: r.index if r.index is not None else 99)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu0.uuid}
    child = subprocess.Popen(
        [sys.executable, "-c", GPU_CHILD, "40"], env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    root = Path(tempfile.mkdtemp(prefix="dolab-gpu-check-"))
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            print(f"gpu check: the PyTorch process did not start (exit {child.wait(30)})", file=sys.stderr)
            return 2
        started = datetime.now(timezone.utc).isoformat()
        slot = {"uuid": gpu0.uuid, "index": gpu0.index, "name": gpu0.name, "host": "local"}
        user = {
            "name": "gpu-check",
            "servers": {"": {"started": started, "state": {"backend": "local", "slots": [slot]}}},
        }
        client = HubClient("http://127.0.0.1:9/hub/api", "unused")
        monitor = Monitor(
            client,
            AsyncLedger(UsageLedger(f"sqlite:///{root / 'ledger.sqlite'}")),
            source,
            QuotaEnforcer(StopPath(client)),
        )
        monitor.runs = server_runs([user], GpuPrices())
        rows: list[dict] = []
        for _ in range(20):  # NVML lists a new process within a second or two
            await asyncio.sleep(1)
            monitor.readings = await source.read()
            rows = (await monitor.overview())["gpus"]
            mine = next((g for g in rows if g["uuid"] == gpu0.uuid), None)
            if mine and child.pid in [p["pid"] for p in mine["processes"]]:
                break
        monitor.ledger.close()
        mine = next((g for g in rows if g["uuid"] == gpu0.uuid), {})
        elsewhere = [
            g["uuid"] for g in rows if g["uuid"] != gpu0.uuid and child.pid in [p["pid"] for p in g["processes"]]
        ]
        found = child.pid in [p["pid"] for p in mine.get("processes", [])]
        print(
            f"GPU {gpu0.index} ({gpu0.uuid}) while pid {child.pid} runs a matmul loop: holder {mine.get('holder')!r},"
            f" use {mine.get('utilization_percent')}%, memory {mine.get('memory_used_gb')} GB,"
            f" processes {mine.get('processes')}"
        )
        ok = found and mine.get("holder") == "gpu-check/" and not elsewhere
        print(
            "gpu check: "
            + ("OK: the process is attributed to the server holding the slot" if ok else "FAILED")
            + ("" if found else "; NVML did not list the process on its GPU")
            + (f"; also listed on {elsewhere}" if elsewhere else "")
        )
        return 0 if ok else 1
    finally:
        child.kill()
        child.wait(10)
        await source.close()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Set up, measure, print; 2 when a prerequisite is missing, 1 when the run failed."""
    args = parse_args(argv)
    if args.gpu_check:
        import asyncio

        return asyncio.run(gpu_check())
    try:
        import psutil
    except ImportError:
        print("monitor bench: psutil is not installed: `.venv/bin/pip install -e '.[bench]'`", file=sys.stderr)
        return 2
    try:
        proxy = find_proxy()
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    bench = MonitorBench(Path(tempfile.mkdtemp(prefix="dolab-monitor-bench-")), psutil)
    try:
        with interrupts_as_keyboard_interrupt():
            bench.start_stub()
            bench.start_hub(proxy, spawn_limit=args.users + 100, interval=args.interval)
            progress(f"hub up at {bench.hub_url} (log {bench.log_path})")
            setup_s = populate(bench, args.users, 0, args.spawn_concurrency)
            progress(f"{args.users} servers ready in {setup_s:.1f} s; waiting for the monitor's ticks")
            wait_for_ticks(bench, args.users)
            ticks = measure_ticks(bench, args.ticks, args.interval)
            # the dolab-admin role made the user at the hub's start; an admin as the shipped config makes them
            bench.api("PATCH", f"/users/{ADMIN_USER}", json={"admin": True}).raise_for_status()
            reply = bench.api("POST", f"/users/{ADMIN_USER}/tokens", json={"note": "bench", "expires_in": 3600})
            reply.raise_for_status()
            session = requests.Session()
            session.headers["Authorization"] = f"token {reply.json()['token']}"
            base = f"{bench.hub_url}/services/{MONITOR}/"
            overview, overview_size = latency(session, base + "api/overview", args.requests)
            usage, usage_size = latency(session, base + "api/usage?user=u0000", args.requests)
            metrics = bench.metrics()
    except KeyboardInterrupt:
        print("monitor bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    except (BenchFailed, requests.RequestException, OSError) as e:
        print(f"monitor bench: the run failed: {e}", file=sys.stderr)
        return 1
    finally:
        with uninterrupted():
            bench.stop()
            shutil.rmtree(bench.root, ignore_errors=True)
    cpu = [c for c, _ in ticks]
    wall = [w for _, w in ticks]
    rss_mb = metrics.get("process_resident_memory_bytes", 0) / 2**20
    print()
    print(
        f"dolab-monitor at {args.users} running servers ({GPUS} local GPUs held, "
        f"{sum(1 for i in range(GPUS, args.users) if i % 10 == 0)} RunPod pods), tick every {args.interval:g} s"
    )
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.machine()}")
    print(f"tick CPU    {summary(cpu)}   ({len(cpu)} ticks)")
    print(f"tick wall   {summary(wall)}")
    print(f"api/overview             {summary(overview)}   ({overview_size / 1024:.0f} KiB)")
    print(f"api/usage?user=u0000     {summary(usage)}   ({usage_size / 1024:.1f} KiB)")
    print(f"service RSS {rss_mb:.0f} MB (target < 200 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
