"""Spawn latency of a DO-LAB docker GPU profile against plain DockerSpawner, same engine, same image.

Each variant runs in a hub of its own (tests/e2e/hub.py: the shipped jupyterhub_config.py plus an overlay, real
proxy, loopback ports), one hub after the other so they never share the CPUs:

- ``dolab``: DoLabSpawner, one ``backend: docker`` profile with ``gpus: 1``, a static inventory of one fake GPU
  whose device node is a copy of /dev/null (``gpu_attach = "devices"``, no control devices);
- ``docker``: plain DockerSpawner (``remove = True``, ``hub_connect_url`` at engine 1's bridge address).

Per hub: one warm-up spawn that is not counted, then N sequential spawns of one user. A spawn is timed with
``time.perf_counter`` from sending ``POST /hub/api/users/<u>/server`` to

- ``ready``: the first ``GET /hub/api/users/<u>`` (polled every 50 ms) that shows the server ready, and
- ``api``: the first 200 from ``GET /user/<u>/api`` through the proxy with a user token (polled every 50 ms
  once the hub says ready);

then the server is stopped, and the next spawn waits until the hub no longer lists it and its container is gone.
Prints median, p95 (linear interpolation), min and max per measure and the DO-LAB / DockerSpawner ratios against
the target (<= 1.05). It prints numbers and asserts nothing about them::

    .venv/bin/python bench/spawn_latency.py [--spawns N | --quick] [--rounds R] [--json OUT] [--logs DIR]

Needs the Docker test stack (`make stack-up`); exits 2 with a sentence when it is not up. Every hub, its proxy and
services, and every container it started (labels ``dolab.test=1`` and ``dolab.bench=<run id>``) are stopped and
removed on exit, on an error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
from _signals import interrupts_as_keyboard_interrupt, uninterrupted  # bench/_signals.py, beside this script

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


from tests.e2e.hub import Hub, free_port  # noqa: E402
from tests.e2e.stack import STACK_JSON, DockerStack  # noqa: E402

USER = "bench"
POLL_SECONDS = 0.05
SPAWN_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 60.0
MIN_SPAWNS = 10
QUICK_SPAWNS = 2
TARGET_RATIO = 1.05
VARIANTS = ("dolab", "docker")
LABELS = {"dolab": "DO-LAB GPU", "docker": "DockerSpawner"}


class StackNotUp(Exception):
    """The Docker test stack is missing or does not answer; the message says what to do."""


class SpawnFailed(Exception):
    """A measured spawn or stop did not complete; the message carries the hub's log tail."""


# ----- the stack and the machine -------------------------------------------------------------------------


def load_stack() -> DockerStack:
    """The stack tests/stack.py recorded, checked live: engine 1 answers and has the image."""
    try:
        data = json.loads(STACK_JSON.read_text())
        known = {f.name for f in fields(DockerStack)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        stack = DockerStack(**values)
    except (OSError, ValueError, TypeError) as e:
        raise StackNotUp(
            f"The Docker test stack is not up ({STACK_JSON} is missing or unreadable: {e}). Start it with"
            " `make stack-up`."
        ) from None
    try:
        client = engine(stack.docker_host)
        client.ping()
        client.images.get(stack.image)
    except docker.errors.ImageNotFound:
        raise StackNotUp(
            f"The Docker test stack is incomplete: engine {stack.docker_host} has no image {stack.image}. Run"
            " `make stack-up`."
        ) from None
    except (docker.errors.DockerException, requests.RequestException) as e:
        raise StackNotUp(
            f"The Docker test stack is not up: engine {stack.docker_host} does not answer ({e}). Start it with"
            " `make stack-up`."
        ) from None
    return stack


def engine(url: str) -> docker.DockerClient:
    """A client of one engine, with a timeout on every call."""
    return docker.DockerClient(base_url=url, timeout=30)


def machine_info(stack: DockerStack) -> dict[str, Any]:
    """What the numbers were measured on."""
    client = engine(stack.docker_host)
    image = client.images.get(stack.image)

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "?"

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "docker_engine": client.version().get("Version", "?"),
        "docker_host": stack.docker_host,
        "image": stack.image,
        "image_id": image.id,
        "python": platform.python_version(),
        "jupyterhub": version("jupyterhub"),
        "dockerspawner": version("dockerspawner"),
        "loadavg_before": list(os.getloadavg()),
    }


# ----- the two hubs --------------------------------------------------------------------------------------


def fake_gpu(dev_dir: Path) -> dict[str, Any]:
    """One inventory entry and its device node (a copy of /dev/null), as tests/e2e/test_docker_backend.py makes."""
    node = dev_dir / "bench-nvidia0"
    if not node.exists():
        try:
            os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))
        except PermissionError:
            raise RuntimeError("the fake GPU's device node needs mknod: run the bench as root") from None
    return {"index": 0, "uuid": "GPU-bench-0", "name": "NVIDIA A100 80GB", "memory_gb": 80, "device": str(node)}


def overlay_for(variant: str, stack: DockerStack, root: Path, hub_port: int, labels: dict[str, str]) -> str:
    """The hub overlay of one variant; both use the same engine, image and container labels."""
    if variant == "dolab":
        dev = root / "dev"
        dev.mkdir(parents=True, exist_ok=True)
        profiles = [{"display_name": "Docker GPU", "slug": "dgpu", "backend": "docker", "gpus": 1, "default": True}]
        return f"""
c.DoLabSpawner.profile_list = {profiles!r}
c.DoLabSpawner.gpu_inventory = {[fake_gpu(dev)]!r}
c.DoLabSpawner.docker_hosts = {[{"name": "local", "url": stack.docker_host}]!r}
c.DockerSpawner.image = {stack.image!r}
c.DockerSpawner.extra_create_kwargs = {{"labels": {labels!r}}}
c.DockerBackend.gpu_attach = "devices"
c.DockerBackend.gpu_control_devices = []
"""
    return f"""
c.JupyterHub.spawner_class = "docker"
c.DockerSpawner.client_kwargs = {{"base_url": {stack.docker_host!r}}}
c.DockerSpawner.image = {stack.image!r}
c.DockerSpawner.remove = True
c.DockerSpawner.extra_create_kwargs = {{"labels": {labels!r}}}
c.DockerSpawner.hub_connect_url = {f"http://{stack.bridge_ip}:{hub_port}"!r}
"""


def user_options_for(variant: str) -> dict[str, Any] | None:
    """What the POST carries: DO-LAB's profile, nothing for DockerSpawner."""
    return {"profile": "dgpu"} if variant == "dolab" else None


def _start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/<pid>/stat), to tell it from a later one with the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _children(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of the direct children of ``pid``: the hub's proxy and services."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        after = stat.rsplit(")", 1)[1].split()
        if int(after[1]) == pid:
            found.add((int(entry.name), after[19]))
    return found


@dataclass
class Cleanup:
    """Everything the bench started, to stop and remove whatever happens."""

    docker_host: str
    run_label: str
    hubs: list[Hub] = field(default_factory=list)
    processes: set[tuple[int, str]] = field(default_factory=set)
    _client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        """The engine the containers run on (one client for the whole run)."""
        if self._client is None:
            self._client = engine(self.docker_host)
        return self._client

    def containers(self) -> list[Any]:
        """This run's containers, running or not."""
        return self.client.containers.list(all=True, filters={"label": self.run_label})

    def track(self, hub: Hub) -> None:
        """Remember the hub's own children (proxy, services): they run in sessions of their own."""
        if hub.proc is not None and hub.proc.poll() is None:
            self.processes |= _children(hub.proc.pid)

    def hub_done(self, hub: Hub) -> None:
        """Stop one hub now (its servers through the API first), then whatever it left."""
        self.track(hub)
        hub.shutdown()
        self._kill_leftover_processes()
        self.remove_containers()

    def remove_containers(self) -> list[str]:
        """Force-remove this run's containers; returns their names."""
        removed = []
        try:
            for container in self.containers():
                container.remove(force=True)
                removed.append(container.name)
        except (docker.errors.DockerException, requests.RequestException) as e:
            print(f"warning: could not remove the bench's containers ({self.run_label}): {e}", file=sys.stderr)
        return removed

    def _kill_leftover_processes(self) -> None:
        alive = [(pid, start) for pid, start in self.processes if _start_time(pid) == start]
        for pid, _ in alive:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [(pid, start) for pid, start in alive if _start_time(pid) == start]
        for pid, _ in alive:
            _signal(pid, signal.SIGKILL)
        self.processes.clear()

    def all(self) -> None:
        """At exit: every hub, its children, every container of this run."""
        for hub in self.hubs:
            try:
                self.track(hub)
                hub.shutdown()
            except Exception as e:  # one hub that fails to stop must not keep the others running
                print(f"warning: stopping the hub in {hub.root} failed: {e}", file=sys.stderr)
                if hub.proc is not None and hub.proc.poll() is None:
                    hub.proc.kill()
        self._kill_leftover_processes()
        removed = self.remove_containers()
        if removed:
            print(f"removed left-over container(s): {', '.join(removed)}", file=sys.stderr)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ----- one spawn -----------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One spawn: seconds from sending the POST to each event."""

    ready_s: float
    api_s: float
    post_s: float
    post_status: int
    stop_s: float


def _paced() -> Iterator[None]:
    """Yield every POLL_SECONDS, counted from the previous start, not from the previous end."""
    next_at = time.perf_counter()
    while True:
        next_at += POLL_SECONDS
        time.sleep(max(0.0, next_at - time.perf_counter()))
        yield


def spawn_once(hub: Hub, variant: str, user_token: str, cleanup: Cleanup) -> Sample:
    """Start the server, time ready and api, stop it and wait until it and its container are gone."""
    post: dict[str, Any] = {}
    poster = requests.Session()  # the hub's session is used by the polls, on this thread
    poster.headers["Authorization"] = f"token {hub.token}"
    options = user_options_for(variant)
    body = None if options is None else {"user_options": options}

    def send(t0: float) -> None:
        try:
            reply = poster.post(f"{hub.url}/hub/api/users/{USER}/server", json=body, timeout=SPAWN_TIMEOUT_SECONDS)
            post.update(status=reply.status_code, text=reply.text, at=time.perf_counter() - t0)
        except requests.RequestException as e:
            post.update(status=0, text=str(e), at=time.perf_counter() - t0)

    t0 = time.perf_counter()
    thread = threading.Thread(target=send, args=(t0,), daemon=True)
    thread.start()
    ready_s = 0.0
    for _ in _paced():
        server = hub.user(USER).get("servers", {}).get("", {})
        now = time.perf_counter() - t0
        if server.get("ready"):
            ready_s = now
            break
        if "status" in post and post["status"] not in (201, 202):
            raise SpawnFailed(f"POST returned {post['status']}: {post['text']}\n{hub.log_tail()}")
        if "status" in post and not server:
            raise SpawnFailed(f"the server is gone after POST {post['status']}\n{hub.log_tail()}")
        if now > SPAWN_TIMEOUT_SECONDS:
            raise SpawnFailed(f"not ready in {SPAWN_TIMEOUT_SECONDS:g} s: {server}\n{hub.log_tail()}")
    api_s = 0.0
    api_url = f"{hub.url}/user/{USER}/api"
    for _ in _paced():
        try:
            reply = requests.get(
                api_url, headers={"Authorization": f"token {user_token}"}, allow_redirects=False, timeout=10
            )
            if reply.status_code == 200:
                api_s = time.perf_counter() - t0
                break
        except requests.RequestException:
            pass
        if time.perf_counter() - t0 > SPAWN_TIMEOUT_SECONDS:
            raise SpawnFailed(f"{api_url} did not answer 200 in {SPAWN_TIMEOUT_SECONDS:g} s\n{hub.log_tail()}")
    thread.join(SPAWN_TIMEOUT_SECONDS)
    poster.close()
    return Sample(ready_s, api_s, post.get("at", float("nan")), post.get("status", 0), stop(hub, cleanup))


def stop(hub: Hub, cleanup: Cleanup) -> float:
    """Stop the server; seconds until the hub no longer lists it and no container of the run is left."""
    t0 = time.perf_counter()
    reply = hub.api("DELETE", f"/users/{USER}/server")
    if reply.status_code not in (202, 204):
        raise SpawnFailed(f"DELETE returned {reply.status_code}: {reply.text}\n{hub.log_tail()}")
    hub_done = False
    for _ in _paced():
        hub_done = hub_done or "" not in hub.user(USER).get("servers", {})
        if hub_done and not cleanup.containers():
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > STOP_TIMEOUT_SECONDS:
            raise SpawnFailed(f"the server did not go away in {STOP_TIMEOUT_SECONDS:g} s\n{hub.log_tail()}")
    raise AssertionError("unreachable")


# ----- one variant ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """One hub of one variant: the warm-up and the counted spawns."""

    variant: str
    round: int
    warmup: Sample
    samples: list[Sample]


def run_variant(
    variant: str, round_: int, spawns: int, stack: DockerStack, tmp: Path, cleanup: Cleanup, logs: Path | None
) -> Run:
    """Start this variant's hub, warm up, measure ``spawns`` spawns, stop the hub."""
    root = tmp / f"{variant}-{round_}"
    hub_port = free_port()
    labels = {"dolab.test": "1", "dolab.bench": cleanup.run_label.split("=", 1)[1]}
    env = {"DOLAB_HUB_IP": "0.0.0.0", "DOLAB_HUB_PORT": str(hub_port)}
    hub = Hub(root, overlay=overlay_for(variant, stack, root, hub_port, labels), env=env)
    cleanup.hubs.append(hub)
    try:
        hub.start()
        cleanup.track(hub)
        hub.create_user(USER)
        token = hub.user_token(USER)
        name = LABELS[variant]
        warmup = spawn_once(hub, variant, token, cleanup)
        cleanup.track(hub)
        progress(f"{name} (round {round_ + 1}): warm-up ready {warmup.ready_s:.3f} s, api {warmup.api_s:.3f} s")
        samples = []
        for i in range(spawns):
            sample = spawn_once(hub, variant, token, cleanup)
            samples.append(sample)
            progress(
                f"{name} (round {round_ + 1}): {i + 1}/{spawns} ready {sample.ready_s:.3f} s,"
                f" api {sample.api_s:.3f} s, stop {sample.stop_s:.3f} s (POST {sample.post_status}"
                f" after {sample.post_s:.3f} s)"
            )
        return Run(variant, round_, warmup, samples)
    finally:
        cleanup.hub_done(hub)
        cleanup.hubs.remove(hub)
        if logs is not None and hub.log_path.exists():
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(hub.log_path, logs / f"{variant}-{round_ + 1}.log")


def progress(line: str) -> None:
    """A line on stderr while the bench runs."""
    print(line, file=sys.stderr, flush=True)


# ----- numbers -------------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    """n, median, p95 (linear interpolation between order statistics), min and max."""
    ordered = sorted(values)
    # quantiles needs two points; the 19th of 20 cut points is the 95th percentile
    p95 = ordered[0] if len(ordered) == 1 else statistics.quantiles(ordered, n=20, method="inclusive")[18]
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p95": p95,
        "min": ordered[0],
        "max": ordered[-1],
    }


def report(runs: list[Run], machine: dict[str, Any], spawns: int, rounds: int) -> dict[str, Any]:
    """Print the table and the ratios; return the summary for --json."""
    measures = {"ready": "hub reports ready", "api": "GET /user/<u>/api answers 200 via the proxy"}
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for measure in measures:
        stats[measure] = {
            v: summary([getattr(s, f"{measure}_s") for r in runs if r.variant == v for s in r.samples])
            for v in VARIANTS
        }
    print()
    print("Spawn latency: DO-LAB docker GPU profile vs plain DockerSpawner (same engine, same image)")
    print(
        f"machine: nproc {machine['nproc']}, Docker Engine {machine['docker_engine']}, image {machine['image']}"
        f" ({machine['image_id']}), JupyterHub {machine['jupyterhub']}, DockerSpawner {machine['dockerspawner']}"
    )
    before, after = machine["loadavg_before"], machine["loadavg_after"]
    print(
        f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in before)} before,"
        f" {' '.join(f'{x:.2f}' for x in after)} after (other work on this machine skews the numbers)"
    )
    order = " then ".join(LABELS[r.variant] for r in runs)
    print(f"runs: {order}; per hub 1 warm-up (not counted) + {spawns} sequential spawns; {rounds} round(s)")
    for measure, meaning in measures.items():
        print(f"  {measure:<6} seconds from sending POST /hub/api/users/<u>/server until {meaning} (50 ms polls)")
    print()
    print(f"{'measure':<8} {'variant':<14} {'n':>3} {'median':>8} {'p95':>8} {'min':>8} {'max':>8}")
    for measure in measures:
        for v in VARIANTS:
            s = stats[measure][v]
            print(
                f"{measure:<8} {LABELS[v]:<14} {s['n']:>3} {s['median']:>8.3f} {s['p95']:>8.3f}"
                f" {s['min']:>8.3f} {s['max']:>8.3f}"
            )
    print()
    print(f"ratio DO-LAB / DockerSpawner (target: ratio <= {TARGET_RATIO:.2f})")
    ratios: dict[str, dict[str, float]] = {}
    for measure in measures:
        ratios[measure] = {}
        cells = []
        for key in ("median", "p95"):
            ratio = stats[measure]["dolab"][key] / stats[measure]["docker"][key]
            ratios[measure][key] = ratio
            verdict = "within target" if ratio <= TARGET_RATIO else "over target"
            cells.append(f"{key} {ratio:.3f} ({verdict})")
        print(f"{measure:<8} " + ", ".join(cells))
    return {"stats": stats, "ratios": ratios, "target_ratio": TARGET_RATIO}


# ----- main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--spawns", type=int, default=MIN_SPAWNS, help=f"counted spawns per hub (>= {MIN_SPAWNS})")
    count.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK_SPAWNS} spawns per hub")
    parser.add_argument(
        "--rounds", type=int, default=1, help="hubs per variant, the order alternating each round (default 1)"
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the raw samples and the summary here")
    parser.add_argument("--logs", type=Path, metavar="DIR", help="keep each hub's log here (<variant>-<round>.log)")
    args = parser.parse_args(argv)
    if args.quick:
        args.spawns = QUICK_SPAWNS
    elif args.spawns < MIN_SPAWNS:
        parser.error(f"--spawns must be at least {MIN_SPAWNS} (or pass --quick for a smoke run of {QUICK_SPAWNS})")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run both variants, print the table; 2 when the stack is not up, 1 when a spawn failed."""
    args = parse_args(argv)
    try:
        stack = load_stack()
    except StackNotUp as e:
        print(f"spawn_latency: {e}", file=sys.stderr)
        return 2
    machine = machine_info(stack)
    run_id = uuid.uuid4().hex[:12]
    cleanup = Cleanup(stack.docker_host, f"dolab.bench={run_id}")
    tmp = Path(tempfile.mkdtemp(prefix="dolab-bench-"))
    runs: list[Run] = []
    try:
        with interrupts_as_keyboard_interrupt():
            for round_ in range(args.rounds):
                order = VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS))
                for variant in order:
                    runs.append(run_variant(variant, round_, args.spawns, stack, tmp, cleanup, args.logs))
    except KeyboardInterrupt:
        print("spawn_latency: interrupted; cleaning up", file=sys.stderr)
        return 130
    except (SpawnFailed, TimeoutError, RuntimeError, requests.RequestException, docker.errors.DockerException) as e:
        print(f"spawn_latency: the run failed: {e}", file=sys.stderr)
        return 1
    finally:
        with uninterrupted():
            cleanup.all()
            shutil.rmtree(tmp, ignore_errors=True)
    machine["loadavg_after"] = list(os.getloadavg())
    result = report(runs, machine, args.spawns, args.rounds)
    if args.json:
        raw = {
            "machine": machine,
            "spawns_per_hub": args.spawns,
            "rounds": args.rounds,
            "poll_seconds": POLL_SECONDS,
            "runs": [
                {
                    "variant": r.variant,
                    "label": LABELS[r.variant],
                    "round": r.round + 1,
                    "warmup": asdict(r.warmup),
                    "samples": [asdict(s) for s in r.samples],
                }
                for r in runs
            ],
            **result,
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
        print(f"\nraw samples: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
