"""The cost of one culler sweep over 1,000 running servers: DO-LAB's culler beside jupyterhub-idle-culler 2.0.

One real hub (JupyterHub subprocess with a config of the bench's own, the real configurable-http-proxy, loopback
ports, SQLite in a temporary folder) whose spawner starts nothing: ``BenchSpawner``, written into the temporary
folder and put on the hub's PYTHONPATH, returns the address of one shared stub HTTP server (a subprocess on
127.0.0.1 that answers every request, ``[]`` to ``api/kernels``, and counts the kernel reads), ``poll()`` says
it is running, and its state carries what DO-LAB's spawner stores (``server_url``, ``backend`` "local",
``profile``, no GPU ``slots``). Users are created and their servers started through the REST API with a service
token (at most ``--spawn-concurrency`` at once), so every server was active a minute or two ago.

Then, per round (``--rounds``, the order of the first two alternating), one sweep each of:

- ``idle-culler``: jupyterhub-idle-culler 2.0's ``cull_idle`` coroutine, imported and awaited once with what
  ``python -m jupyterhub_idle_culler --timeout=3600 --api-page-size=50`` passes it (its other flags at their
  defaults); its command line has no way to sweep once, and nothing is culled (no server is near an hour idle);
- ``DO-LAB``: :class:`dolab_services.culler.sweeper.Sweeper` with the built-in policy (CPU servers: 24 h idle),
  dry run, as ``python -m dolab_services.culler --once --dry-run`` builds it; nothing is near its timeout, so no
  kernel is read;
- ``DO-LAB, N near``: the same with a policy whose rule for the profile of ``--candidates`` servers (every tenth)
  has a 15 min idle timeout and a 20 min warning, so those servers are near their idle stop: their kernels are
  read from the stub (the hub's ``POST /users/:name/activity`` cannot move ``last_activity`` back, so a policy
  makes them candidates). Dry run: nothing is stopped and no activity is recorded.

Both cullers run in this process, each in an event loop of its own, with tokens of services that have their
documented scopes (DO-LAB: ``CULLER_SCOPES``; idle-culler: ``list:users``, ``read:users:activity``,
``read:servers``, ``delete:servers``). Per sweep:

- ``wall``: seconds around the awaited sweep (``time.perf_counter``);
- ``hub CPU``: user + system CPU seconds of the hub process over the same span (psutil), the cost that matters
  on a shared hub; ``culler CPU``: this process's CPU time over the span (the culler's own work, plus psutil);
- ``requests``: hub API requests made with the culler's token, counted from the hub's access log (every API
  request is logged at INFO as ``200 GET /hub/api/... (<service>@127.0.0.1)``) between two marker requests the
  bench sends before and after the sweep. Counting the log adds nothing to the path being measured, which a
  counting proxy in front of the hub would;
- ``kernel reads``: ``api/kernels`` requests the stub answered during the sweep.

The hub's own periodic work is moved out of the way (server polls and the proxy's activity refresh every hour)
so that the hub's CPU over a sweep is the sweep's. Prints a table, the medians over rounds and the target
(DO-LAB's wall time no more than idle-culler's when nothing is near its timeout); it asserts nothing::

    .venv/bin/python bench/culler_sweep.py [--users 1000] [--candidates 100] [--rounds 5] [--log HUB_LOG]

Needs ``pip install -e '.[bench]'`` (jupyterhub-idle-culler 2.0.0, psutil) and configurable-http-proxy; exits 2
with a sentence when one is missing. The hub, its proxy, the stub and the temporary folder are removed on exit,
on an error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import platform
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import requests
from _signals import interrupts_as_keyboard_interrupt, uninterrupted  # bench/_signals.py, beside this script

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dolab_services.culler.policy import CullPolicy  # noqa: E402
from dolab_services.culler.registration import CULLER_SCOPES  # noqa: E402
from dolab_services.culler.sweeper import Sweeper, SweepReport  # noqa: E402
from dolab_services.culler.telemetry import load_telemetry  # noqa: E402
from dolab_services.hubclient import HubClient  # noqa: E402
from dolab_services.servertokens import ServerTokens  # noqa: E402
from dolab_services.stop import StopPath  # noqa: E402

PAGINATION = {"Accept": "application/jupyterhub-pagination+json"}
IDLE_CULLER_TIMEOUT = 3600
IDLE_CULLER_PAGE_SIZE = 50
IDLE_CULLER_SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]
NEAR_PROFILE = "cpu-near"
#: The policy of the candidates case: servers of NEAR_PROFILE stop after 15 min idle, warned 20 min before, so
#: a server active a few minutes ago is near its idle stop (and warned, not stopped, while the run is short).
NEAR_POLICY = {"rules": [{"profile": NEAR_PROFILE, "idle_hours": 0.25}], "warn_before_minutes": 20}
ADMIN, DOLAB, IDLE = "bench-admin", "bench-dolab-culler", "bench-idle-culler"
ACCESS_LINE = re.compile(r"\] (\d{3}) ([A-Z]+) (/hub/api/\S*) .*\((\S*)@")

SPAWNER_MODULE = '''\
"""Written by bench/culler_sweep.py: a spawner that starts nothing and answers from a shared stub server."""

from jupyterhub.spawner import Spawner
from jupyterhub.utils import url_path_join
from traitlets import Unicode


class BenchSpawner(Spawner):
    stub_url = Unicode("", config=True, help="The shared stub server every spawn returns.")

    async def start(self):
        return self.stub_url

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None

    def get_state(self):
        state = super().get_state()
        if self.server is not None:
            state.update(
                server_url=url_path_join(self.stub_url, self.server.base_url),
                backend="local",
                profile=(self.user_options or {}).get("profile") or "cpu",
                slots=[],
            )
        return state
'''

STUB_SERVER = '''\
"""Written by bench/culler_sweep.py: answers every GET (``[]`` to api/kernels) and counts the kernel reads."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


lock = threading.Lock()
counts = {"kernels": 0, "other": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes: without TCP_NODELAY, Nagle and delayed ACKs add ~40 ms a read
    disable_nagle_algorithm = True

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/__bench__/counts":
            with lock:
                body = json.dumps(counts)
        elif path.rstrip("/").endswith("/api/kernels"):
            with lock:
                counts["kernels"] += 1
            body = "[]"
        else:
            with lock:
                counts["other"] += 1
            body = "{}"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    # the default backlog of 5 drops concurrent connects, which then wait a 1 s SYN retry
    request_queue_size = 128
    daemon_threads = True


server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
'''

HUB_CONFIG = """\
# Written by bench/culler_sweep.py: a hub of 1,000 trivial servers; c is provided by JupyterHub's config loader.
c.JupyterHub.bind_url = {bind_url!r}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.command = {proxy_command!r}
c.ConfigurableHTTPProxy.api_url = {proxy_api_url!r}
c.ConfigurableHTTPProxy.pid_file = {proxy_pid!r}
c.JupyterHub.db_url = {db_url!r}
c.JupyterHub.cookie_secret_file = {cookie_secret!r}
c.JupyterHub.pid_file = {hub_pid!r}
c.JupyterHub.log_level = "INFO"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "benchspawner.BenchSpawner"
c.BenchSpawner.stub_url = {stub_url!r}
c.Spawner.start_timeout = 300
c.Spawner.http_timeout = 120
# no periodic work of the hub during a sweep: server polls and the proxy's activity refresh once an hour
c.Spawner.poll_interval = 3600
c.JupyterHub.last_activity_interval = 3600
c.JupyterHub.proxy_check_interval = 3600
c.JupyterHub.service_check_interval = 3600
c.JupyterHub.concurrent_spawn_limit = {spawn_limit}
c.JupyterHub.active_server_limit = 0
c.JupyterHub.init_spawners_timeout = 600
# the bench stops the hub; the servers are stubs, there is nothing to stop
c.JupyterHub.cleanup_servers = False
c.JupyterHub.services = {services!r}
c.JupyterHub.load_roles = {roles!r}
"""


class Missing(Exception):
    """A prerequisite of the bench is missing; the message says what to install."""


class BenchFailed(Exception):
    """The hub or the stub did not come up, or the setup of the servers failed."""


# ----- prerequisites and the machine ---------------------------------------------------------------------


def prerequisites() -> tuple[ModuleType, ModuleType, list[str]]:
    """jupyterhub_idle_culler, psutil and the configurable-http-proxy command, or Missing with a sentence."""
    modules = []
    for module, package in (("jupyterhub_idle_culler", "jupyterhub-idle-culler==2.0.0"), ("psutil", "psutil")):
        try:
            modules.append(importlib.import_module(module))
        except ImportError:
            raise Missing(
                f"{package} is not installed: install the bench's extras with `.venv/bin/pip install -e '.[bench]'`"
            ) from None
    version = _version("jupyterhub-idle-culler")
    if version != "2.0.0":
        print(
            f"culler_sweep: note: jupyterhub-idle-culler {version}, not the 2.0.0 the issue measured", file=sys.stderr
        )
    candidates = [
        REPO / ".dolab" / "node" / "node_modules" / ".bin" / "configurable-http-proxy",
        Path(sys.executable).parent / "configurable-http-proxy",
    ]
    found = next((str(c) for c in candidates if c.exists()), None) or shutil.which("configurable-http-proxy")
    if not found:
        raise Missing(
            "configurable-http-proxy is not installed: `make run` installs it, or `.venv/bin/pip install"
            " configurable-http-proxy`"
        )
    return modules[0], modules[1], [found]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def progress(line: str) -> None:
    """A line on stderr while the bench runs."""
    print(line, file=sys.stderr, flush=True)


# ----- the hub and the stub ------------------------------------------------------------------------------


@dataclass
class Bench:
    """The temporary folder, the stub, the hub and its children: everything to stop and remove at the end."""

    root: Path
    psutil: ModuleType
    tokens: dict[str, str] = field(default_factory=lambda: {n: secrets.token_hex(24) for n in (ADMIN, DOLAB, IDLE)})
    stub: subprocess.Popen[bytes] | None = None
    stub_url: str = ""
    hub: subprocess.Popen[bytes] | None = None
    hub_url: str = ""
    children: list[Any] = field(default_factory=list)
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def log_path(self) -> Path:
        return self.root / "hub.log"

    @property
    def api_url(self) -> str:
        return f"{self.hub_url}/hub/api"

    def start_stub(self) -> None:
        """Start the shared stub server and read its port."""
        script = self.root / "stub.py"
        script.write_text(STUB_SERVER)
        self.stub = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True
        )
        assert self.stub.stdout is not None
        line = self.stub.stdout.readline().strip()
        if not line.isdigit():
            raise BenchFailed(f"the stub server did not start (exit status {self.stub.poll()})")
        self.stub_url = f"http://127.0.0.1:{int(line)}"

    def stub_counts(self) -> dict[str, int]:
        """How many requests the stub answered so far, kernel reads apart."""
        reply = requests.get(f"{self.stub_url}/__bench__/counts", timeout=10)
        reply.raise_for_status()
        return {str(k): int(v) for k, v in reply.json().items()}

    def start_hub(self, proxy_command: list[str], spawn_limit: int, timeout: float = 90) -> None:
        """Write the spawner module and the config, start the hub and wait until its API answers."""
        (self.root / "benchspawner.py").write_text(SPAWNER_MODULE)
        data = self.root / "data"
        data.mkdir()
        self.hub_url = f"http://127.0.0.1:{free_port()}"
        services = [{"name": name, "api_token": token, "display": False} for name, token in self.tokens.items()]
        roles = [
            {"name": ADMIN, "scopes": ["admin:users", "admin:servers", "list:users"], "services": [ADMIN]},
            {"name": DOLAB, "scopes": list(CULLER_SCOPES), "services": [DOLAB]},
            {"name": IDLE, "scopes": IDLE_CULLER_SCOPES, "services": [IDLE]},
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
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "DOLAB_"))}
        env["PYTHONPATH"] = os.pathsep.join([str(self.root), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the hub keeps writing to it
        self.hub = subprocess.Popen(
            [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(config)],
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the bench, which stops the hub in order
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

    def log_tail(self, lines: int = 40) -> str:
        """The end of the hub's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A request to the hub's REST API as the bench's admin service."""
        kwargs.setdefault("timeout", 120)
        return self.session.request(method, f"{self.api_url}{path}", **kwargs)

    def ready_count(self) -> int:
        """How many users have a ready server."""
        reply = self.api("GET", "/users?state=ready&limit=1", headers=PAGINATION)
        reply.raise_for_status()
        return int(reply.json()["_pagination"]["total"])

    def stop(self) -> None:
        """Stop the hub (SIGTERM, then SIGKILL), whatever it left running, and the stub."""
        self.session.close()
        procs: list[Any] = []
        if self.hub is not None:
            try:
                procs.append(self.psutil.Process(self.hub.pid))
                self.children = self.children or self.psutil.Process(self.hub.pid).children(recursive=True)
            except self.psutil.Error:
                pass
        procs += self.children
        if self.stub is not None:
            try:
                procs.append(self.psutil.Process(self.stub.pid))
            except self.psutil.Error:
                pass
        # the hub first: it stops its proxy itself; then whatever is left
        for group in (procs[:1] if self.hub is not None else [], procs):
            alive = []
            for proc in group:
                try:
                    proc.terminate()
                    alive.append(proc)
                except self.psutil.Error:
                    pass
            _, alive = self.psutil.wait_procs(alive, timeout=15)
            for proc in alive:
                try:
                    proc.kill()
                except self.psutil.Error:
                    pass
            self.psutil.wait_procs(alive, timeout=5)
        for popen in (self.hub, self.stub):
            if popen is not None:
                if popen.stdout is not None:
                    popen.stdout.close()
                try:
                    popen.wait(5)
                except subprocess.TimeoutExpired:
                    pass


# ----- the 1,000 servers ---------------------------------------------------------------------------------


def user_names(count: int) -> list[str]:
    return [f"u{i:04d}" for i in range(count)]


def near(index: int, users: int, candidates: int) -> bool:
    """Whether user number ``index`` gets the profile that the candidates policy times out soon."""
    if candidates <= 0:
        return False
    step = max(1, users // candidates)
    return index % step == 0 and index // step < candidates


def populate(bench: Bench, users: int, candidates: int, concurrency: int) -> float:
    """Create the users and start their servers through the REST API; seconds it took."""
    t0 = time.perf_counter()
    names = user_names(users)
    for i in range(0, len(names), 200):
        reply = bench.api("POST", "/users", json={"usernames": names[i : i + 200]})
        if reply.status_code != 201:
            raise BenchFailed(f"creating users answered {reply.status_code}: {reply.text[:300]}")
    progress(f"created {users} users in {time.perf_counter() - t0:.1f} s; starting their servers")
    asyncio.run(_start_servers(bench, names, candidates, concurrency))
    deadline = time.monotonic() + 300
    while (ready := bench.ready_count()) < users:
        if time.monotonic() > deadline:
            raise BenchFailed(f"only {ready} of {users} servers ready after 300 s:\n{bench.log_tail()}")
        time.sleep(0.5)
    return time.perf_counter() - t0


async def _start_servers(bench: Bench, names: list[str], candidates: int, concurrency: int) -> None:
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    http = AsyncHTTPClient(force_instance=True, max_clients=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    done = 0
    failures: list[str] = []

    async def start(index: int, name: str) -> None:
        nonlocal done
        profile = NEAR_PROFILE if near(index, len(names), candidates) else "cpu"
        request = HTTPRequest(
            f"{bench.api_url}/users/{quote(name)}/server",
            method="POST",
            headers={"Authorization": f"token {bench.tokens[ADMIN]}", "Content-Type": "application/json"},
            body=json.dumps({"user_options": {"profile": profile}}),
            request_timeout=300,
        )
        async with semaphore:
            response = await http.fetch(request, raise_error=False)
        if response.code not in (201, 202):
            failures.append(f"{name}: {response.code} {(response.body or b'').decode(errors='replace')[:200]}")
        done += 1
        if done % 200 == 0:
            progress(f"  {done}/{len(names)} servers started")

    try:
        await asyncio.gather(*(start(i, n) for i, n in enumerate(names)))
    finally:
        http.close()
    if failures:
        raise BenchFailed(f"{len(failures)} server start(s) failed, e.g. {failures[0]}\n{bench.log_tail()}")


# ----- one measured sweep --------------------------------------------------------------------------------


@dataclass
class Measure:
    """One sweep of one culler."""

    case: str
    round: int
    wall_s: float
    hub_cpu_s: float
    culler_cpu_s: float
    requests: Counter[str]
    kernel_reads: int
    note: str = ""

    @property
    def request_count(self) -> int:
        return sum(self.requests.values())


def marker(bench: Bench, label: str) -> str:
    """Send a marker request the hub logs; returns its query string."""
    query = f"bench_marker={re.sub(r'[^A-Za-z0-9]+', '-', label)}-{secrets.token_hex(4)}"
    bench.api("GET", f"/?{query}").raise_for_status()
    return query


def requests_between(bench: Bench, begin: str, end: str, service: str) -> Counter[str]:
    """The hub API requests ``service`` made between the two markers, by status and method."""
    deadline = time.monotonic() + 10
    while True:
        text = bench.log_path.read_text(errors="replace")
        if end in text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if end not in text:
        raise BenchFailed(f"the hub's log has no line for the marker {end}")
    section = text[text.index(begin) : text.index(end)]
    found: Counter[str] = Counter()
    for match in ACCESS_LINE.finditer(section):
        status, method, _, who = match.groups()
        if who == service:
            found[f"{method} {status}"] += 1
    return found


def measure(bench: Bench, case: str, round_: int, service: str, sweep: Callable[[], Awaitable[str]]) -> Measure:
    """Run one sweep in an event loop of its own, between markers; wall time, CPU, requests, kernel reads."""
    hub = bench.psutil.Process(bench.hub.pid if bench.hub else 0)
    result: dict[str, Any] = {}

    async def timed() -> None:
        cpu0, own0, reads0 = hub.cpu_times(), time.process_time(), bench.stub_counts()["kernels"]
        t0 = time.perf_counter()
        result["note"] = await sweep()
        result["wall"] = time.perf_counter() - t0
        cpu1, own1 = hub.cpu_times(), time.process_time()
        result["hub_cpu"] = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        result["own_cpu"] = own1 - own0
        result["reads"] = bench.stub_counts()["kernels"] - reads0

    begin = marker(bench, f"{case}-begin")
    asyncio.run(timed())
    end = marker(bench, f"{case}-end")
    found = requests_between(bench, begin, end, service)
    return Measure(
        case, round_, result["wall"], result["hub_cpu"], result["own_cpu"], found, result["reads"], result["note"]
    )


def dolab_sweep(bench: Bench, policy: CullPolicy, tokens: list[ServerTokens]) -> Callable[[], Awaitable[str]]:
    """One DO-LAB sweep, built as ``python -m dolab_services.culler --once --dry-run`` builds it."""
    log = logging.getLogger("bench.dolab-culler")
    # The running culler keeps its per-server tokens between sweeps (``tokens``, shared by the rounds): the first
    # sweep mints one per server it reads (one hub request each), later ones reuse them. Each sweep has its own
    # event loop and hub client.

    async def sweep() -> str:
        hub = HubClient(bench.api_url, bench.tokens[DOLAB])
        if not tokens:
            tokens.append(ServerTokens(hub, "bench: reads this server's kernels"))
        tokens[0].hub = hub
        telemetry = load_telemetry("nvml")  # read only for servers holding GPUs: none here
        sweeper = Sweeper(
            hub,
            policy,
            telemetry,
            StopPath(hub, [], dry_run=True, log=log),
            tokens[0],
            dry_run=True,
            log=log,
        )
        try:
            report: SweepReport = await sweeper.sweep()
        finally:
            sweeper.close()
            hub.close()
            await telemetry.close()
        return (
            f"{report.servers} servers, {report.inspected} inspected, {report.unreadable} unreadable,"
            f" {report.warned} warned, {report.stopped} stopped"
        )

    return sweep


def idle_culler_sweep(bench: Bench, module: ModuleType) -> Callable[[], Awaitable[str]]:
    """One jupyterhub-idle-culler sweep: ``cull_idle`` with the CLI's defaults, timeout 3600, page size 50."""
    log = logging.getLogger("bench.idle-culler")
    culled: list[str] = []

    class Culled(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Culling"):
                culled.append(record.getMessage())

    async def sweep() -> str:
        handler = Culled(logging.INFO)
        log.addHandler(handler)
        try:
            await module.cull_idle(
                url=bench.api_url,
                api_token=bench.tokens[IDLE],
                inactive_limit=IDLE_CULLER_TIMEOUT,
                logger=log,
                concurrency=10,
                api_page_size=IDLE_CULLER_PAGE_SIZE,
            )
        finally:
            log.removeHandler(handler)
        return f"{len(culled)} culled"

    return sweep


def culler_peak_rss_mb(bench: Bench) -> float:
    """Peak RSS (MiB) of the culler service itself over one sweep: ``python -m dolab_services.culler --once
    --dry-run`` as the hub would start it, with the culler's token, run under a small wrapper so that the peak
    (``RUSAGE_CHILDREN``) is the service's alone."""
    wrapper = (
        "import resource, subprocess, sys, json;"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "print(json.dumps({'rc': p.returncode, 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,"
        " 'err': p.stderr[-400:]}))"
    )
    env = {
        **os.environ,
        "JUPYTERHUB_API_TOKEN": bench.tokens[DOLAB],
        "JUPYTERHUB_API_URL": bench.api_url,
    }
    command = [sys.executable, "-c", wrapper, sys.executable, "-m", "dolab_services.culler", "--once", "--dry-run"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=True)
    data = json.loads(done.stdout.strip().splitlines()[-1])
    if data["rc"] != 0:
        raise BenchFailed(f"the culler service exited with {data['rc']}: {data['err']}")
    return float(data["rss"])


# ----- the report ----------------------------------------------------------------------------------------


def report(
    measures: list[Measure], machine: dict[str, Any], args: argparse.Namespace, setup_s: float, rss_mb: float | None
) -> None:
    """Print every sweep, the medians and the target line."""
    print()
    print(
        f"Culler sweep over {args.users} running servers (trivial spawner, one shared stub server),"
        f" JupyterHub {machine['jupyterhub']}, SQLite"
    )
    print(
        f"machine: nproc {machine['nproc']}, {machine['cpu']}, Python {machine['python']};"
        f" jupyterhub-idle-culler {machine['idle_culler']}; load average before"
        f" {' '.join(f'{x:.2f}' for x in machine['loadavg_before'])}, after"
        f" {' '.join(f'{x:.2f}' for x in machine['loadavg_after'])}"
    )
    print(
        f"setup: {args.users} users and servers through the REST API in {setup_s:.1f} s;"
        f" {args.rounds} round(s); idle-culler: --timeout={IDLE_CULLER_TIMEOUT}"
        f" --api-page-size={IDLE_CULLER_PAGE_SIZE}; DO-LAB: built-in policy, dry run;"
        f" 'N near': {args.candidates} servers of a profile with a 15 min idle timeout, 20 min warning"
    )
    print("requests: hub API requests with the culler's token (hub access log between markers)")
    print()
    header = (
        f"{'case':<18} {'round':>5} {'wall s':>8} {'hub CPU s':>10} {'culler CPU s':>13} {'requests':>9}"
        f" {'kernel reads':>13}  outcome"
    )
    print(header)
    print("-" * len(header))
    for m in measures:
        methods = ", ".join(f"{n} {k}" for k, n in sorted(m.requests.items()))
        print(
            f"{m.case:<18} {m.round:>5} {m.wall_s:>8.3f} {m.hub_cpu_s:>10.3f} {m.culler_cpu_s:>13.3f}"
            f" {m.request_count:>9} {m.kernel_reads:>13}  {m.note} ({methods})"
        )
    print()
    print(f"{'median over rounds':<18} {'':>5} {'wall s':>8} {'hub CPU s':>10} {'culler CPU s':>13} {'requests':>9}")
    medians: dict[str, float] = {}
    for case in dict.fromkeys(m.case for m in measures):
        rows = [m for m in measures if m.case == case]
        wall = statistics.median(m.wall_s for m in rows)
        medians[case] = wall
        print(
            f"{case:<18} {'':>5} {wall:>8.3f} {statistics.median(m.hub_cpu_s for m in rows):>10.3f}"
            f" {statistics.median(m.culler_cpu_s for m in rows):>13.3f}"
            f" {statistics.median(m.request_count for m in rows):>9g}"
        )
    print()
    dolab, idle = medians.get("DO-LAB"), medians.get("idle-culler")
    if dolab is not None and idle:
        verdict = "met" if dolab <= idle else "NOT met"
        print(
            f"target: DO-LAB no slower than idle-culler when nothing is near its timeout: median wall"
            f" {dolab:.3f} s vs {idle:.3f} s (ratio {dolab / idle:.2f}): {verdict}"
        )
    if rss_mb is not None:
        print(
            f"memory: the culler service's peak RSS over one sweep of {args.users} servers"
            f" (python -m dolab_services.culler --once --dry-run): {rss_mb:.0f} MiB (target: under 200 MB at 500)"
        )


# ----- main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000, help="users, each with a running server (default 1000)")
    parser.add_argument(
        "--candidates", type=int, default=100, help="servers near their idle timeout in the last case (default 100)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="sweeps of each case (default 5)")
    parser.add_argument(
        "--spawn-concurrency", type=int, default=20, help="server starts in flight at once during the setup"
    )
    parser.add_argument("--log", type=Path, metavar="HUB_LOG", help="keep a copy of the hub's log here")
    args = parser.parse_args(argv)
    if args.users < 1 or args.rounds < 1 or args.spawn_concurrency < 1:
        parser.error("--users, --rounds and --spawn-concurrency must be at least 1")
    if not 0 <= args.candidates <= args.users:
        parser.error("--candidates must be between 0 and --users")
    return args


def main(argv: list[str] | None = None) -> int:
    """Set up the hub, sweep, print; 2 when a prerequisite is missing, 1 when the run failed."""
    args = parse_args(argv)
    try:
        idle_culler, psutil, proxy_command = prerequisites()
    except Missing as e:
        print(f"culler_sweep: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    machine: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jupyterhub": _version("jupyterhub"),
        "idle_culler": _version("jupyterhub-idle-culler"),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                machine["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bench = Bench(Path(tempfile.mkdtemp(prefix="dolab-culler-bench-")), psutil)
    measures: list[Measure] = []
    try:
        with interrupts_as_keyboard_interrupt():
            bench.start_stub()
            bench.start_hub(proxy_command, spawn_limit=args.users + 100)
            progress(f"hub up at {bench.hub_url} (log {bench.log_path}); stub at {bench.stub_url}")
            setup_s = populate(bench, args.users, args.candidates, args.spawn_concurrency)
            progress(f"{args.users} servers ready in {setup_s:.1f} s")
            bench.api("GET", "/users?state=ready&limit=200", headers=PAGINATION).raise_for_status()  # warm-up
            machine["loadavg_before"] = list(os.getloadavg())
            near_policy = CullPolicy.from_config(NEAR_POLICY)
            tokens: list[ServerTokens] = []  # the culler's per-server tokens, kept between sweeps as it keeps them
            for round_ in range(1, args.rounds + 1):
                cases: list[tuple[str, str, Callable[[], Awaitable[str]]]] = [
                    ("idle-culler", IDLE, idle_culler_sweep(bench, idle_culler)),
                    ("DO-LAB", DOLAB, dolab_sweep(bench, CullPolicy(), tokens)),
                ]
                if round_ % 2 == 0:
                    cases.reverse()
                if args.candidates:
                    cases.append((f"DO-LAB, {args.candidates} near", DOLAB, dolab_sweep(bench, near_policy, tokens)))
                for case, service, sweep in cases:
                    m = measure(bench, case, round_, service, sweep)
                    measures.append(m)
                    progress(
                        f"round {round_}: {case}: {m.wall_s:.3f} s, hub CPU {m.hub_cpu_s:.3f} s,"
                        f" {m.request_count} requests, {m.kernel_reads} kernel reads ({m.note})"
                    )
            machine["loadavg_after"] = list(os.getloadavg())
            rss_mb = culler_peak_rss_mb(bench)
            progress(f"culler service peak RSS over one sweep: {rss_mb:.0f} MiB")
    except KeyboardInterrupt:
        print("culler_sweep: interrupted; cleaning up", file=sys.stderr)
        return 130
    except (BenchFailed, requests.RequestException, OSError, subprocess.SubprocessError, ValueError) as e:
        print(f"culler_sweep: the run failed: {e}", file=sys.stderr)
        return 1
    finally:
        with uninterrupted():
            if args.log is not None and bench.log_path.exists():
                shutil.copy(bench.log_path, args.log)
            bench.stop()
            shutil.rmtree(bench.root, ignore_errors=True)
    report(measures, machine, args, setup_s, rss_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
