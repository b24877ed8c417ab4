"""The monitor end to end: a real hub (tests/e2e/hub.py, the shipped config, local backend, real single-user
servers) starts ``dolab-monitor``, fed by a simulated telemetry source (a JSON file of GPU readings).

Prices make time cheap to test: a local A100 costs 3,600 USD per GPU-hour, one dollar a second. quinn may spend
20 USD a day (warned from 10, stopped at 20); rita's group ``gpu-team`` has 100 GPU-hours a day, so she runs on.
Then: quinn's next GPU spawn is refused before any slot is taken (a CPU one starts), the hub restarts (and the
monitor with it) without rita's time being counted twice, the page needs a login and shows each user only their
own data, admins see every GPU, and the metrics parse.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
import requests
from bs4 import BeautifulSoup
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.hub import GPU_INVENTORY, Hub, free_port
from tests.patience import patience

pytestmark = pytest.mark.e2e

PREFIX = "/services/dolab-monitor/"
QUINN, RITA, ADMIN = "quinn", "rita", "admin"
QUOTAS = {
    "users": {QUINN: {"usd": {"day": 20}}},
    "groups": {"gpu-team": {"gpu_hours": {"day": 100}}},
    "default": {"usd": {"day": 1000}},
}


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def login(hub: Hub, user: str, password_file: str = "shared-password") -> requests.Session:
    """A browser-like session logged in through the hub's login form."""
    session = requests.Session()
    page = session.get(f"{hub.url}/hub/login", timeout=30)
    form = BeautifulSoup(page.text, "html.parser").find("form")
    assert form is not None
    fields = {i["name"]: i.get("value", "") for i in form.find_all("input") if i.get("name")}
    fields.update(username=user, password=(hub.data_dir / password_file).read_text().strip())
    action = str(form.get("action") or "/hub/login")
    reply = session.post(hub.url + action if action.startswith("/") else page.url, data=fields, timeout=30)
    assert reply.status_code == 200, reply.text[:500]
    return session


def wait_for(what: str, check: Callable[[], Any], hub: Hub, timeout: float = 60) -> Any:
    timeout = patience(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout:g} s\n{hub.log_tail(60)}")


class Monitor:
    """The monitor's API through the proxy, with each user's token."""

    def __init__(self, hub: Hub, tokens: dict[str, str]) -> None:
        self.hub, self.tokens = hub, tokens

    def get(self, path: str, user: str) -> requests.Response:
        headers = {"Authorization": f"token {self.tokens[user]}"}
        return requests.get(f"{self.hub.url}{PREFIX}{path}", headers=headers, timeout=30)

    def usage(self, user: str) -> dict[str, Any]:
        reply = self.get("api/usage", user)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def log(self) -> str:
        return self.hub.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitor]:
    root = tmp_path_factory.mktemp("monitor")
    (root / "quotas.json").write_text(json.dumps(QUOTAS))
    (root / "gpus.json").write_text(
        json.dumps(
            [
                {**{k: g[k] for k in ("uuid", "index", "name")}, "utilization_percent": 80 - 60 * i, "power_w": 200}
                for i, g in enumerate(GPU_INVENTORY)
            ]
        )
    )
    profiles = [
        {"display_name": "CPU only", "slug": "cpu", "default": True},
        {"display_name": "One A100", "slug": "a100", "gpus": 1, "gpu_type": "A100"},
    ]
    overlay = (
        f"c.DoLabSpawner.profile_list = {profiles!r}\n"
        f"c.DoLabSpawner.gpu_inventory = {GPU_INVENTORY!r}\n"
        "c.JupyterHub.load_roles.append("
        "{'name': 'dolab-test-groups', 'scopes': ['admin:groups'], 'services': ['dolab-test']})\n"
    )
    env = {
        "DOLAB_MONITOR_INTERVAL": "1",
        "DOLAB_MONITOR_PORT": str(free_port()),
        "DOLAB_MONITOR_TELEMETRY": f"file:{root / 'gpus.json'}",
        "DOLAB_MONITOR_QUOTAS_FILE": str(root / "quotas.json"),
        "DOLAB_MONITOR_GPU_PRICES": json.dumps({"A100": 3600}),
        # Warned from 10 USD on: ten seconds in which a busy test machine surely sees the warning.
        "DOLAB_MONITOR_WARN_PERCENT": "50",
    }
    hub = Hub(root, overlay=overlay, env=env).start()
    try:
        for user in (QUINN, RITA, ADMIN):
            hub.create_user(user)
        assert hub.api("POST", "/groups/gpu-team").status_code in (201, 409)
        reply = hub.api("POST", "/groups/gpu-team/users", json={"users": [RITA]})
        assert reply.status_code == 200, reply.text
        tokens = {user: hub.user_token(user) for user in (QUINN, RITA, ADMIN)}
        for user in (QUINN, RITA):
            reply = hub.start_server(user, {"profile": "a100"})
            assert reply.status_code in (201, 202), reply.text
        yield Monitor(hub, tokens)
    finally:
        hub.shutdown()


def test_a_warning_at_the_threshold_then_a_stop_at_100_percent(stack: Monitor) -> None:
    hub = stack.hub
    hub.wait_ready(QUINN)
    warning = wait_for("quinn is warned", lambda: stack.usage(QUINN)["warnings"], hub, timeout=60)
    # The warning came while the server still ran, and says what it means.
    assert warning[0]["metric"] == "usd" and warning[0]["period"] == "day"
    assert 50 <= warning[0]["percent"] < 100
    assert "At 100% your GPU servers are stopped" in warning[0]["message"]
    wait_for("quinn's server is stopped", lambda: "" not in hub.user(QUINN)["servers"], hub, timeout=60)
    assert "Quota warning: quinn has used" in stack.log()
    wait_for("the stop is logged", lambda: "Stopped server quinn/, reason quota (usd per day:" in stack.log(), hub)
    usage = stack.usage(QUINN)
    assert usage["usage"]["day"]["usd"] >= 20
    assert not usage["quota"]["allowed"]
    assert [s["outcome"] for s in usage["stops"]] == ["stopped"]


def test_a_gpu_spawn_over_quota_is_refused_before_any_slot_is_taken(stack: Monitor) -> None:
    hub = stack.hub
    wait_for("quinn's server is stopped", lambda: "" not in hub.user(QUINN)["servers"], hub, timeout=90)
    reply = hub.start_server(QUINN, {"profile": "a100"})
    assert reply.status_code == 403, reply.text
    message = reply.json()["message"]
    assert message.startswith("Your GPU quota is used up: ")
    assert "of 20 USD today (user quinn)" in message and "You can start a GPU server again" in message
    assert "" not in hub.user(QUINN)["servers"]
    held = [s for u in hub.users() for srv in u["servers"].values() for s in (srv.get("state") or {}).get("slots", [])]
    assert len(held) == 1, f"only rita's GPU may be held: {held}"
    assert "Refusing to start quinn's server: Your GPU quota is used up" in stack.log()
    # A CPU server costs nothing a quota counts: it starts.
    reply = hub.start_server(QUINN, {"profile": "cpu"})
    assert reply.status_code in (201, 202), reply.text
    hub.wait_ready(QUINN)
    hub.stop_server(QUINN)


def test_a_monitor_restart_never_counts_time_twice(stack: Monitor) -> None:
    hub = stack.hub
    server = hub.wait_ready(RITA)
    started = parse(server["started"]).timestamp()
    before = stack.usage(RITA)
    assert before["quota"]["source"] == "group gpu-team"
    # The GPU reading of the slot rita holds (80% on GPU 0, 20% on GPU 1), mapped to her server.
    [uuid] = before["servers"][0]["gpu_uuids"]
    expected = {g["uuid"]: 80 - 60 * i for i, g in enumerate(GPU_INVENTORY)}[uuid]
    assert before["servers"][0]["utilization_percent"] == expected
    hours_before = before["usage"]["day"]["gpu_hours"]
    assert hours_before > 0
    hub.restart()  # the hub starts its services again: a new monitor process on the same ledger
    assert "" in hub.user(RITA)["servers"], "rita's server survives the hub restart"

    def ticked_after_restart() -> dict[str, Any] | None:
        reply = stack.get("api/usage", RITA)
        if reply.status_code != 200:
            return None
        body = reply.json()
        return body if body["last_tick"] and body["usage"]["day"]["gpu_hours"] > hours_before else None

    after = wait_for("the restarted monitor books rita's time", ticked_after_restart, hub, timeout=90)
    # Everything booked lies between the start and the moment the monitor answered: never more.
    booked_seconds = after["usage"]["day"]["gpu_hours"] * 3600
    assert booked_seconds <= parse(after["at"]).timestamp() - started + 1.0, "an interval was booked twice"
    assert after["usage"]["day"]["usd"] == pytest.approx(booked_seconds, rel=1e-6)  # 1 USD per GPU-second
    assert (hub.data_dir / "monitor.sqlite").exists()


def test_the_page_needs_a_login_and_shows_a_user_only_their_own_data(stack: Monitor) -> None:
    hub = stack.hub
    hub.wait_ready(RITA)
    anonymous = requests.get(f"{hub.url}{PREFIX}", timeout=30, allow_redirects=False)
    assert anonymous.status_code == 302 and "/hub/" in anonymous.headers["Location"]
    assert requests.get(f"{hub.url}{PREFIX}api/usage", timeout=30).status_code == 403

    rita = login(hub, RITA)
    page = rita.get(f"{hub.url}{PREFIX}", timeout=30)
    assert page.status_code == 200 and page.url.endswith(PREFIX), page.url
    soup = BeautifulSoup(page.text, "html.parser")
    assert soup.find("section", id="quota")["data-allowed"] == "yes"
    servers = soup.find_all("section", class_="server")
    assert [s["data-server"] for s in servers] == [""]
    assert servers[0].find("svg") is not None and servers[0].find("polyline") is not None, "a plot of GPU use"
    assert soup.find("section", id="admin") is None
    assert QUINN not in page.text
    assert rita.get(f"{hub.url}{PREFIX}?user={QUINN}", timeout=30).status_code == 403

    quinn = login(hub, QUINN)
    soup = BeautifulSoup(quinn.get(f"{hub.url}{PREFIX}", timeout=30).text, "html.parser")
    assert soup.find("section", id="quota")["data-allowed"] == "no"
    assert "Your GPU quota is used up" in soup.find("section", id="quota").text
    assert RITA not in soup.text

    assert stack.get(f"api/usage?user={RITA}", QUINN).status_code == 403
    assert stack.get("api/overview", QUINN).status_code == 403
    assert stack.get(f"api/quota/{RITA}", QUINN).status_code == 403
    assert stack.usage(QUINN)["user"] == QUINN and stack.usage(QUINN)["servers"] == []


def test_an_admin_sees_every_gpu_and_its_holder(stack: Monitor) -> None:
    hub = stack.hub
    hub.wait_ready(RITA)
    reply = stack.get("api/overview", ADMIN)
    assert reply.status_code == 200, reply.text
    overview = reply.json()
    gpus = {g["uuid"]: g for g in overview["gpus"]}
    assert set(gpus) == {g["uuid"] for g in GPU_INVENTORY}
    held = [g for g in gpus.values() if g["holder"]]
    assert [g["holder"] for g in held] == [f"{RITA}/"]
    assert overview["totals"]["gpus_held"] == 1 and overview["totals"]["day"]["usd"] > 20
    assert stack.get(f"api/usage?user={QUINN}", ADMIN).json()["user"] == QUINN
    nobody = stack.get("api/usage?user=nobody", ADMIN)
    assert nobody.status_code == 404 and nobody.json()["message"] == "There is no user 'nobody'."
    admin = login(hub, ADMIN, "admin-password")
    soup = BeautifulSoup(admin.get(f"{hub.url}{PREFIX}", timeout=30).text, "html.parser")
    rows = soup.find("section", id="admin").find_all("tr", class_="gpu")
    assert sorted(r.find("td", class_="holder").text for r in rows) == ["free", f"{RITA}/"]


def test_the_metrics_scrape_parses(stack: Monitor) -> None:
    text = requests.get(f"{stack.hub.url}{PREFIX}metrics", timeout=30).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    names = {s.name for s in samples}
    assert {
        "dolab_gpu_utilization_percent",
        "dolab_gpu_held",
        "dolab_servers_running",
        "dolab_gpu_seconds_total",
    } <= names
    held = {s.labels["index"]: s.value for s in samples if s.name == "dolab_gpu_held"}
    assert sorted(held.values()) == [0.0, 1.0]
    assert not any(n.startswith("dolab_user_") for n in names)
    assert all(s.name.startswith(("dolab_", "process_", "python_")) for s in samples)
