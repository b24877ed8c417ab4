"""The culler end to end: a real hub starts ``dolab-culler`` from the shipped config, real single-user servers.

Short times come from a policy file (every server: 20 s idle, a 10 s warning, a sweep every 2 s) and GPU use from
a telemetry file. The hub learns the proxy's activity every 2 s and the servers report theirs every 2 s: a culler
that read kernels through the proxy, or counted as API activity, would keep every server alive, and the idle
test would fail.

Every scenario's server starts at once in one module fixture, and a watcher thread records when each server
disappears, its last_activity over time and the deadline users' warnings. Each test then checks its own server
on that timeline, so the waits overlap and the file runs in about two and a half minutes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import pytest
import requests
import websocket
from bs4 import BeautifulSoup
from prometheus_client.parser import text_string_to_metric_families

from ..patience import patience
from .hub import GPU_INVENTORY, Hub, free_port

pytestmark = pytest.mark.e2e

IDLE_SECONDS = 20.0
WARN_SECONDS = 10.0
INTERVAL_SECONDS = 2.0
#: How late a stop may come after it is due: a sweep interval, a kernel read, the hub's stop, our polling.
LATE_SECONDS = INTERVAL_SECONDS + 8
GPU0 = GPU_INVENTORY[0]["uuid"]
PREFIX = "/services/dolab-culler/"

# Who plays which part.
IDLE, IDLE_SERVER = "ivan", "idle-1"  # (b) idle, a named server
HUNG = "hugo"  # (g) SIGSTOPped: its API hangs
BUSY = "bella"  # (a) a silent time.sleep cell
DEADLINE = "dora"  # (c) busy, stop_at about a minute after the start
EXTEND = "dana"  # (d) exempt (no idle stop), stop_at later; extends it
EXEMPT = "erin"  # (e) exempt, idle
GPU = "gwen"  # (f) idle, GPU busy per the telemetry file
DEADLINE_RUN_SECONDS = 60
EXTEND_RUN_SECONDS = 95


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def start_busy_kernel(hub: Hub, user: str, token: str, code: str, server: str = "") -> str:
    """Start a kernel through the proxy, send ``code`` over its websocket, wait until it is busy, close the socket.

    Nothing else is sent afterwards: the kernel stays busy with no browser and no client.
    """
    base = f"{hub.url}/user/{quote(user, safe='')}/{server + '/' if server else ''}"
    headers = {"Authorization": f"token {token}"}
    reply = requests.post(f"{base}api/kernels", headers=headers, json={}, timeout=patience(60))
    reply.raise_for_status()
    kernel_id = reply.json()["id"]
    ws_url = base.replace("http://", "ws://", 1) + f"api/kernels/{kernel_id}/channels"
    ws = websocket.create_connection(ws_url, header=[f"Authorization: token {token}"], timeout=patience(60))
    try:
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "username": user,
            "session": uuid.uuid4().hex,
            "msg_type": "execute_request",
            "version": "5.3",
            "date": datetime.now(timezone.utc).isoformat(),
        }
        content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False}
        ws.send(
            json.dumps(
                {
                    "header": header,
                    "parent_header": {},
                    "metadata": {},
                    "content": content,
                    "channel": "shell",
                    "buffers": [],
                }
            )
        )
        deadline = time.monotonic() + patience(60)
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
                return kernel_id
        raise TimeoutError("the kernel did not start executing")
    finally:
        ws.close()


@dataclass
class Timeline:
    """What the watcher saw, with wall-clock (time.time()) stamps, comparable with the hub's timestamps."""

    gone: dict[tuple[str, str], float] = field(default_factory=dict)
    activity: dict[tuple[str, str], list[tuple[float, datetime]]] = field(default_factory=dict)
    warnings: dict[str, list[tuple[float, dict[str, Any]]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def last_activity(self, key: tuple[str, str]) -> datetime:
        """The hub's last_activity of the server when last seen."""
        with self.lock:
            return self.activity[key][-1][1]


@dataclass
class Scenario:
    hub: Hub
    timeline: Timeline
    tokens: dict[str, str]
    #: The hub's last_activity of each user's server when it became ready (and, for busy ones, its kernel ran).
    ready_activity: dict[str, datetime]
    stop_at: dict[str, datetime]
    #: When the test saw each user's server ready (time.time()): after the server's own start-up activity report and
    #: the proxy's new route, both of which move the hub's last_activity past ``ready_activity`` on a slow start.
    ready_at: dict[str, float]

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        timeout = patience(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.25)
        raise AssertionError(f"{what}: not within {timeout:g} s\n{self.hub.log_tail(40)}")

    def wait_until(self, what: str, when: float) -> None:
        """Wait until the wall-clock time ``when``."""
        self.wait_for(what, lambda: time.time() > when, max(0.0, when - time.time()) + 5)

    def culler(self, method: str, path: str, user: str, **kwargs: Any) -> requests.Response:
        """A request to the culler's page or API through the proxy, as ``user`` with their token."""
        headers = {"Authorization": f"token {self.tokens[user]}"}
        return requests.request(method, f"{self.hub.url}{PREFIX}{path}", headers=headers, timeout=30, **kwargs)

    def culler_log(self) -> str:
        """The hub's log, which the culler's own lines join."""
        return self.hub.log_path.read_text(errors="replace")

    def wait_for_log(self, line: str, timeout: float = 15) -> None:
        """Wait for ``line`` in the log (the hub may list a server as gone before the culler logs its stop)."""
        self.wait_for(f"{line!r} in the log", lambda: line in self.culler_log(), timeout)

    def running(self, user: str, server: str = "") -> bool:
        return server in self.hub.user(user).get("servers", {})


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("culler")
    policy = root / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "rules": [{"idle_hours": IDLE_SECONDS / 3600}],
                "warn_before_minutes": WARN_SECONDS / 60,
                "exempt_users": [EXEMPT, EXTEND],
            }
        )
    )
    gpu_file = root / "gpu.json"
    gpu_file.write_text(json.dumps({GPU0: 90}))
    profiles = [
        {"display_name": "CPU only", "slug": "cpu", "default": True},
        {"display_name": "One A100", "slug": "a100", "gpus": 1, "gpu_type": "A100"},
    ]
    overlay = (
        f"c.DoLabSpawner.profile_list = {profiles!r}\n"
        f"c.DoLabSpawner.gpu_inventory = {[GPU_INVENTORY[0]]!r}\n"
        "c.DoLabSpawner.max_run_hours = 24\n"
        # Activity reaches the hub within seconds, from the proxy and from the servers themselves.
        "c.JupyterHub.last_activity_interval = 2\n"
        "c.Spawner.environment = {'JUPYTERHUB_ACTIVITY_INTERVAL': '2'}\n"
    )
    env = {
        "DOLAB_CULLER_INTERVAL": f"{INTERVAL_SECONDS:g}",
        "DOLAB_CULLER_POLICY": str(policy),
        "DOLAB_CULLER_TELEMETRY": f"file:{gpu_file}",
        "DOLAB_CULLER_PORT": str(free_port()),
    }
    starts = {
        (IDLE, IDLE_SERVER): {"profile": "cpu"},
        (HUNG, ""): {"profile": "cpu"},
        (BUSY, ""): {"profile": "cpu"},
        (DEADLINE, ""): {"profile": "cpu", "run_hours": DEADLINE_RUN_SECONDS / 3600},
        (EXTEND, ""): {"profile": "cpu", "run_hours": EXTEND_RUN_SECONDS / 3600},
        (EXEMPT, ""): {"profile": "cpu"},
        (GPU, ""): {"profile": "a100"},
    }
    hub = Hub(root, overlay=overlay, env=env).start()
    timeline = Timeline()
    stop_watching = threading.Event()
    stopped_pids: list[int] = []
    try:
        for user, _ in starts:
            hub.create_user(user)
        tokens = {user: hub.user_token(user) for user, _ in starts}
        threading.Thread(target=watch, args=(hub, tokens, timeline, stop_watching), daemon=True).start()
        ready_activity: dict[str, datetime] = {}
        ready_at: dict[str, float] = {}
        stop_at: dict[str, datetime] = {}
        failures: list[str] = []

        def start(user: str, name: str) -> None:
            # Each server's part right after it is ready, well before its idle timeout.
            try:
                reply = hub.start_server(user, starts[(user, name)], name=name)
                assert reply.status_code in (201, 202), reply.text
                model = hub.wait_ready(user, name, timeout=120)
                ready_at[user] = time.time()
                if user == HUNG:
                    os.kill(model["state"]["backend_state"]["pid"], signal.SIGSTOP)
                    stopped_pids.append(model["state"]["backend_state"]["pid"])
                if user in (BUSY, DEADLINE):
                    start_busy_kernel(hub, user, tokens[user], "import time; time.sleep(300)")
                    model = hub.user(user)["servers"][name]
                ready_activity[user] = parse(model["last_activity"])
                if "stop_at" in model["user_options"]:
                    stop_at[user] = parse(model["user_options"]["stop_at"])
            except Exception as e:
                failures.append(f"{user}/{name}: {e!r}")

        began = time.monotonic()
        threads = [threading.Thread(target=start, args=key) for key in starts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(patience(180))
        assert not failures, failures
        print(f"all {len(starts)} servers ready in {time.monotonic() - began:.1f} s")
        yield Scenario(hub, timeline, tokens, ready_activity, stop_at, ready_at)
    finally:
        stop_watching.set()
        for pid in stopped_pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        hub.shutdown()


def watch(hub: Hub, tokens: dict[str, str], timeline: Timeline, stop: threading.Event) -> None:
    """Every half second: which servers run and their last_activity; the deadline users' warnings."""
    session = requests.Session()
    session.headers["Authorization"] = f"token {hub.token}"
    running: set[tuple[str, str]] = set()
    while not stop.is_set():
        now = time.time()
        try:
            reply = session.get(f"{hub.url}/hub/api/users?limit=200", timeout=10)
            reply.raise_for_status()
            seen = set()
            with timeline.lock:
                for user in reply.json():
                    for name, server in (user.get("servers") or {}).items():
                        key = (user["name"], name)
                        if not server.get("ready"):
                            continue
                        seen.add(key)
                        samples = timeline.activity.setdefault(key, [])
                        samples.append((now, parse(server["last_activity"])))
                for key in running - seen:
                    timeline.gone.setdefault(key, now)
            running = seen
            for user in (DEADLINE, EXTEND):
                answer = requests.get(
                    f"{hub.url}{PREFIX}api/warnings",
                    headers={"Authorization": f"token {tokens[user]}"},
                    timeout=10,
                )
                if answer.status_code == 200:
                    with timeline.lock:
                        for warning in answer.json()["warnings"]:
                            timeline.warnings.setdefault(user, []).append((now, warning))
        except (requests.RequestException, ValueError) as e:
            timeline.errors.append(str(e))
        stop.wait(0.5)


def metric(scenario: Scenario, name: str, reason: str) -> float:
    text = requests.get(f"{scenario.hub.url}{PREFIX}metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("reason") == reason:
                return sample.value
    raise AssertionError(f"no {name}{{reason={reason!r}}} in the culler's metrics:\n{text}")


# ----- (b) and (g): idle servers go in time, even while another server hangs --------------------------------


def test_an_idle_server_is_culled_after_its_timeout_while_the_culler_watches_it(scenario: Scenario) -> None:
    key = (IDLE, IDLE_SERVER)
    scenario.wait_for("the idle server is culled", lambda: key in scenario.timeline.gone, IDLE_SECONDS + 60)
    # The hub's last activity never moved after the start: the culler's reads did not count as activity. (The start
    # itself moves it, from the spawn's begin to the server's own first report and its new proxy route: all before
    # the test sees it ready, however slow the start.)
    last = scenario.timeline.last_activity(key)
    moved = last.timestamp() - scenario.ready_at[IDLE]
    assert moved < 5, f"the idle server's activity moved {moved:.1f} s after it was ready"
    idle_for = scenario.timeline.gone[key] - last.timestamp()
    assert IDLE_SECONDS - 1 <= idle_for <= IDLE_SECONDS + LATE_SECONDS, f"culled {idle_for:.1f} s after its activity"
    scenario.wait_for_log(f"Stopped server {IDLE}/{IDLE_SERVER}, reason idle")
    assert metric(scenario, "dolab_server_stops_total", "idle") == 1


def test_a_hung_server_does_not_stop_the_sweep(scenario: Scenario) -> None:
    # The idle server above was culled in time while this one's API hung; the hung one is kept, and said so.
    assert (IDLE, IDLE_SERVER) in scenario.timeline.gone
    scenario.wait_for(
        "the culler logs that it cannot read the hung server",
        lambda: f"Cannot read the kernels of server {HUNG}/ (no answer" in scenario.culler_log(),
        30,
    )
    assert scenario.running(HUNG), "a server whose kernels cannot be read must not be culled as idle"
    assert f"Stopped server {HUNG}/" not in scenario.culler_log()


# ----- (d) extending the deadline ----------------------------------------------------------------------------
# Right after the idle test, before the deadline and exemption tests: it must come before the server's first stop
# time, however slow the start was, and its wait past that time covers theirs.


def login(hub: Hub, user: str) -> requests.Session:
    """A browser-like session logged in to the hub with its login form."""
    session = requests.Session()
    page = session.get(f"{hub.url}/hub/login", timeout=30)
    form = BeautifulSoup(page.text, "html.parser").find("form")
    assert form is not None
    fields = {i["name"]: i.get("value", "") for i in form.find_all("input") if i.get("name")}
    fields.update(username=user, password=(hub.data_dir / "shared-password").read_text().strip())
    action = str(form.get("action") or "/hub/login")
    reply = session.post(hub.url + action if action.startswith("/") else page.url, data=fields, timeout=30)
    assert reply.status_code == 200, reply.text[:500]
    return session


def test_extending_moves_the_deadline_within_the_limit(scenario: Scenario) -> None:
    old = scenario.stop_at[EXTEND]
    assert datetime.now(timezone.utc) < old, "the test came too late to extend before the deadline"

    too_far = scenario.culler("POST", "api/extend", EXTEND, json={"server": "", "hours": 30})
    assert too_far.status_code == 400
    assert "You can extend to at most 24 hours from now" in too_far.json()["message"]
    not_hers = scenario.culler("POST", "api/extend", EXTEND, json={"server": "", "hours": 1, "user": BUSY})
    assert not_hers.status_code == 403 and "only change your own servers" in not_hers.json()["message"]
    no_such = scenario.culler("POST", "api/extend", EXTEND, json={"server": "other", "hours": 1})
    assert no_such.status_code == 400 and "You have no running server 'other'" in no_such.json()["message"]

    reply = scenario.culler("POST", "api/extend", EXTEND, json={"server": "", "hours": 1})
    assert reply.status_code == 200, reply.text
    assert (parse(reply.json()["stop_at"]) - old).total_seconds() == pytest.approx(3600, abs=1)

    # The page, as a browser gets it through the hub's OAuth: the new stop time and a one-click button.
    browser = login(scenario.hub, EXTEND)
    home = BeautifulSoup(browser.get(f"{scenario.hub.url}/hub/home", timeout=30).text, "html.parser")
    assert home.find("a", href=PREFIX) is not None, "the hub's Services menu links the culler's page"
    page = browser.get(f"{scenario.hub.url}{PREFIX}", timeout=30)
    assert page.status_code == 200 and page.url.endswith(PREFIX), page.url
    section = BeautifulSoup(page.text, "html.parser").find("section", attrs={"data-server": ""})
    assert section is not None
    assert section.find("time")["datetime"] == reply.json()["stop_at"]
    form = section.find("form", class_="extend")
    fields = {i["name"]: i["value"] for i in form.find_all("input")}
    assert fields["action"] == "extend" and fields["hours"] == "2" and fields["_xsrf"]
    assert "Extend by 2 hours" in form.find("button").text
    # Without the XSRF value the cookie is not accepted; with it, the click extends by two more hours.
    forged = browser.post(page.url, data={k: v for k, v in fields.items() if k != "_xsrf"}, timeout=30)
    assert forged.status_code == 403
    clicked = browser.post(page.url, data=fields, timeout=30)
    assert clicked.status_code == 200, clicked.text[:500]
    soup = BeautifulSoup(clicked.text, "html.parser")
    notice = soup.find(class_="notice")
    assert notice is not None and "now stops at" in notice.text
    new = parse(soup.find("section").find("time")["datetime"])
    assert (new - old).total_seconds() == pytest.approx(3 * 3600, abs=1)

    # The server outlives its old deadline, and no deadline warning is left.
    scenario.wait_until("the old deadline passes", old.timestamp() + LATE_SECONDS)
    assert scenario.running(EXTEND), "the extended server was stopped at its old deadline"
    assert scenario.culler("GET", "api/warnings", EXTEND).json() == {"warnings": []}


# ----- (c) the deadline, after a warning ---------------------------------------------------------------------


def test_a_busy_server_is_warned_then_stopped_at_its_deadline(scenario: Scenario) -> None:
    key = (DEADLINE, "")
    deadline = scenario.stop_at[DEADLINE]
    scenario.wait_for(
        "the server stops at its deadline", lambda: key in scenario.timeline.gone, DEADLINE_RUN_SECONDS + 30
    )
    late = scenario.timeline.gone[key] - deadline.timestamp()
    assert -1 <= late <= LATE_SECONDS, f"stopped {late:+.1f} s from its deadline"
    warnings = [(t, w) for t, w in scenario.timeline.warnings.get(DEADLINE, []) if w["server"] == ""]
    assert warnings, "the user was never warned"
    first_seen, warning = warnings[0]
    assert first_seen < scenario.timeline.gone[key]
    assert warning["reason"] == "deadline" and parse(warning["stop_at"]) == deadline
    assert "the stop time you chose" in warning["message"]
    scenario.wait_for_log(f"Stopped server {DEADLINE}/, reason deadline")
    assert f"Stopped server {DEADLINE}/, reason idle" not in scenario.culler_log(), "it was busy, never idle"


# ----- (e) exemptions ----------------------------------------------------------------------------------------


def test_an_exempt_idle_user_is_kept(scenario: Scenario) -> None:
    when = scenario.ready_at[EXEMPT] + IDLE_SECONDS + LATE_SECONDS
    scenario.wait_until("the exempt user's server is idle past its timeout", when)
    assert scenario.running(EXEMPT)
    assert (EXEMPT, "") not in scenario.timeline.gone


# ----- (a) a silent busy kernel ------------------------------------------------------------------------------


def test_a_silent_busy_kernel_is_not_culled(scenario: Scenario) -> None:
    key = (BUSY, "")
    kernel_ran = scenario.ready_activity[BUSY]
    scenario.wait_until("three idle timeouts pass", kernel_ran.timestamp() + 3 * IDLE_SECONDS)
    assert scenario.running(BUSY), "a kernel running a silent cell was culled"
    # The culler recorded the running work as activity: the hub's last_activity moved on with no client at all.
    moved = (scenario.timeline.last_activity(key) - kernel_ran).total_seconds()
    assert moved > IDLE_SECONDS, f"last_activity moved only {moved:.0f} s"
    assert re.search(rf"POST /hub/api/users/{BUSY}/activity \(dolab-culler@", scenario.culler_log())


# ----- (f) GPU use is work too -------------------------------------------------------------------------------


def test_a_busy_gpu_keeps_an_idle_server_until_it_goes_quiet(scenario: Scenario) -> None:
    key = (GPU, "")
    when = scenario.ready_at[GPU] + IDLE_SECONDS + LATE_SECONDS
    scenario.wait_until("the GPU server is idle past its timeout", when)
    assert scenario.running(GPU), "a server whose GPU is busy was culled"
    (scenario.hub.root / "gpu.json").write_text(json.dumps({GPU0: 0}))
    quiet = time.time()
    scenario.wait_for("the quiet GPU server is culled", lambda: key in scenario.timeline.gone, 60)
    after = scenario.timeline.gone[key] - quiet
    assert IDLE_SECONDS - INTERVAL_SECONDS - 1 <= after <= IDLE_SECONDS + LATE_SECONDS, f"culled after {after:.1f} s"
    scenario.wait_for_log(f"Stopped server {GPU}/, reason idle")
    assert metric(scenario, "dolab_server_stops_total", "idle") == 2
    assert metric(scenario, "dolab_server_stops_total", "deadline") == 1
