"""Tests for :mod:`dolab_services.culler` (app, sweeper, registration), ``.stop`` and ``.web``: the pieces, offline
and fast.

The hub is :mod:`tests.hub_double`'s; a second double plays single-user servers (their ``api/kernels``). GPU use
comes from the telemetry module's ``StaticTelemetry``. The real hub, proxy and servers are in
``tests/e2e/test_culler.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import requests
from bs4 import BeautifulSoup
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient
from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

from dolab_core.plans import plans_from_env
from dolab_core.times import format_time, parse_time
from dolab_services.culler.app import Culler
from dolab_services.culler.extensions import ExtensionStore, extended_stop_at
from dolab_services.culler.facts import InspectionError, read_busy_kernels, server_facts
from dolab_services.culler.policy import CullPolicy, Rule, ServerFacts
from dolab_services.culler.registration import CULLER_SCOPES, USER_SCOPE, culler_service
from dolab_services.culler.sweeper import Sweeper
from dolab_services.culler.telemetry import StaticTelemetry
from dolab_services.hubclient import HubClient
from dolab_services.scopes import STOP_SERVERS as STOP
from dolab_services.servertokens import ServerTokens
from dolab_services.stop import STOP_REASONS, StopPath, load_hooks

from .cli_support import isolate_env, unused_url
from .hub_double import HubDouble, serve_hub_double

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
T0 = "2030-01-01T10:00:00.000000Z"
SLOT = {"index": 0, "uuid": "GPU-aaaa", "name": "NVIDIA A100", "memory_gb": 80.0, "host": "local"}


def iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def ago(seconds: float) -> str:
    return iso(datetime.now(timezone.utc) - timedelta(seconds=seconds))


def server_model(
    server_url: str = "",
    *,
    started: str = T0,
    last_activity: str | None = T0,
    profile: str = "cpu",
    backend: str = "local",
    slots: list[dict] | None = None,
    stop_at: str | None = None,
    state: bool = True,
    ready: bool = True,
    pending: str | None = None,
) -> dict[str, Any]:
    """A server model as the hub lists it with read:servers and admin:server_state."""
    options: dict[str, Any] = {"profile": profile}
    if stop_at:
        options["stop_at"] = stop_at
    model: dict[str, Any] = {
        "started": started,
        "last_activity": last_activity,
        "ready": ready,
        "pending": pending,
        "user_options": options,
    }
    if state:
        model["state"] = {
            "profile": profile,
            "backend": backend,
            "slots": slots or [],
            "server_url": server_url,
            "backend_state": {"pid": 1},
        }
        if stop_at:
            model["state"]["stop_at"] = stop_at
    return model


def user_model(name: str, servers: dict[str, dict], groups: list[str] | None = None) -> dict[str, Any]:
    return {"kind": "user", "name": name, "admin": False, "groups": groups or [], "servers": servers}


# ----- facts and times -------------------------------------------------------------------------------------


def test_parse_and_format_times() -> None:
    assert parse_time("2030-01-01T10:00:00.5Z") == datetime(2030, 1, 1, 10, 0, 0, 500000, tzinfo=timezone.utc)
    assert parse_time("2030-01-01T10:00:00") == datetime(2030, 1, 1, 10, tzinfo=timezone.utc), "naive means UTC"
    assert parse_time("2030-01-01T12:00:00+02:00") == datetime(2030, 1, 1, 10, tzinfo=timezone.utc)
    assert parse_time("tomorrow") is None and parse_time(None) is None and parse_time("") is None
    assert format_time(datetime(2030, 1, 1, 12, 0, 0, 999, tzinfo=timezone(timedelta(hours=1)))) == (
        "2030-01-01T11:00:00Z"
    )


FACT_CASES = [
    pytest.param(
        server_model("http://127.0.0.1:1/user/a/"),
        {},
        ServerFacts(
            user="alice",
            server="",
            started=parse_time(T0),  # type: ignore[arg-type]
            last_activity=parse_time(T0),
            profile="cpu",
            backend="local",
            groups=("ml",),
        ),
        id="cpu",
    ),
    pytest.param(
        server_model(profile="a100", slots=[SLOT, {**SLOT, "uuid": "GPU-bbbb"}], stop_at="2030-01-01T18:00:00Z"),
        {},
        {"profile": "a100", "gpus": 2, "stop_at": datetime(2030, 1, 1, 18, tzinfo=timezone.utc)},
        id="gpus-and-user-stop-at",
    ),
    pytest.param(
        server_model(stop_at="2030-01-01T18:00:00Z"),
        {"stop_at": datetime(2030, 1, 1, 20, tzinfo=timezone.utc)},
        {"stop_at": datetime(2030, 1, 1, 20, tzinfo=timezone.utc)},
        id="extended-stop-at-wins",
    ),
    pytest.param(
        server_model(state=False, profile="big"),
        {},
        {"profile": "", "backend": "", "gpus": 0},  # user_options are the user's to write: never read
        id="no-state-no-profile-from-options",
    ),
    pytest.param(
        server_model(last_activity=None, started=None),  # type: ignore[arg-type]
        {},
        {"started": NOW, "last_activity": None},
        id="no-times",
    ),
]


@pytest.mark.parametrize(("model", "kwargs", "expected"), FACT_CASES)
def test_server_facts(model: dict, kwargs: dict, expected: ServerFacts | dict) -> None:
    facts = server_facts(user_model("alice", {}, ["ml"]), "", model, NOW, **kwargs)
    if isinstance(expected, ServerFacts):
        assert facts == expected
    else:
        assert {k: getattr(facts, k) for k in expected} == expected


# ----- extending -------------------------------------------------------------------------------------------

H = timedelta(hours=1)


@pytest.mark.parametrize(
    ("current", "hours", "limit", "expected"),
    [
        pytest.param(NOW + H, 2, 24, NOW + 3 * H, id="moves-later"),
        pytest.param(NOW - H, 2, 24, NOW + 2 * H, id="past-stop-counts-from-now"),
        pytest.param(NOW + 20 * H, 4, 24, NOW + 24 * H, id="up-to-the-limit"),
        pytest.param(NOW + 20 * H, 500, 0, NOW + 520 * H, id="no-limit"),
        pytest.param(
            NOW + 20 * H, 4.5, 24, "at most 24 hours from now (2030-01-02T12:00:00Z); that is 4 more", id="over"
        ),
        pytest.param(None, 1, 24, "no stop time to extend", id="no-stop-time"),
        pytest.param(NOW, 0, 24, "positive number of hours, not 0", id="zero"),
        pytest.param(NOW, "2", 24, "positive number of hours, not '2'", id="string"),
        pytest.param(NOW, True, 24, "positive number of hours", id="bool"),
        pytest.param(NOW, float("nan"), 24, "positive number of hours", id="nan"),
        pytest.param(NOW, 1e12, 0, "too far ahead", id="overflow"),
    ],
)
def test_extended_stop_at(current: datetime | None, hours: Any, limit: float, expected: datetime | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            extended_stop_at(current, hours, NOW, limit)
    else:
        assert extended_stop_at(current, hours, NOW, limit) == expected


def test_extension_store_keeps_one_run_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "extensions.json"
    store = ExtensionStore(path)
    store.set("alice", "", T0, NOW + H)
    store.set("bob", "gpu", T0, NOW + 2 * H)
    again = ExtensionStore(path)
    assert again.get("alice", "", T0) == NOW + H
    assert again.get("alice", "", "2030-01-01T11:00:00Z") is None, "a later start of the server starts afresh"
    again.prune([("alice", "", T0)])
    assert ExtensionStore(path).get("bob", "gpu", T0) is None
    assert ExtensionStore(path).get("alice", "", T0) == NOW + H


def test_extension_store_without_a_file_and_with_a_bad_one(tmp_path: Path) -> None:
    memory = ExtensionStore()
    memory.set("alice", "", T0, NOW)
    assert memory.get("alice", "", T0) == NOW
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert ExtensionStore(bad).get("alice", "", T0) is None


# ----- the stop path ---------------------------------------------------------------------------------------


@pytest.fixture
def hub() -> Iterator[HubDouble]:
    with serve_hub_double() as double:
        yield double


def counter(registry: CollectorRegistry, name: str, reason: str) -> float:
    value = registry.get_sample_value(name, {"reason": reason})
    assert value is not None
    return value


def deletes(hub: HubDouble) -> list[str]:
    return [r["path"] for r in hub.requests if r["method"] == "DELETE"]


async def test_the_stop_path_runs_the_hooks_in_order_then_stops(hub: HubDouble) -> None:
    hub.respond = lambda method, path, query, body: (204, None)
    calls: list[tuple] = []

    async def save(user: str, server: str, reason: str) -> None:
        calls.append(("save", user, server, reason))

    def note(user: str, server: str, reason: str) -> None:  # a plain function is accepted too
        calls.append(("note", user, server, reason))

    async with HubClient(hub.api_url, "culler-token") as client:
        path = StopPath(client, [save, note])
        assert await path.stop("kim o'neil", "", "idle") == "stopped"
        assert await path.stop("alice", "gpu-1", "deadline") == "stopped"
    assert calls == [
        ("save", "kim o'neil", "", "idle"),
        ("note", "kim o'neil", "", "idle"),
        ("save", "alice", "gpu-1", "deadline"),
        ("note", "alice", "gpu-1", "deadline"),
    ]
    assert deletes(hub) == ["/hub/api/users/kim%20o%27neil/server", "/hub/api/users/alice/servers/gpu-1"]
    assert hub.requests[0]["headers"]["Authorization"] == "token culler-token"
    assert counter(path.registry, "dolab_server_stops_total", "idle") == 1
    assert counter(path.registry, "dolab_server_stops_total", "deadline") == 1
    assert counter(path.registry, "dolab_server_stops_total", "quota") == 0, "every reason has its series"


async def test_a_raising_hook_blocks_the_stop(hub: HubDouble, caplog: pytest.LogCaptureFixture) -> None:
    hub.respond = lambda method, path, query, body: (204, None)
    later: list[str] = []

    async def broken(user: str, server: str, reason: str) -> None:
        raise RuntimeError("the workspace upload failed")

    async def after(user: str, server: str, reason: str) -> None:
        later.append(user)

    async with HubClient(hub.api_url, "t") as client:
        path = StopPath(client, [broken, after])
        assert await path.stop("alice", "", "idle") == "blocked"
    assert deletes(hub) == [] and later == []
    assert counter(path.registry, "dolab_server_stop_blocked_total", "idle") == 1
    assert counter(path.registry, "dolab_server_stops_total", "idle") == 0
    assert "Not stopping server alice/ (reason idle): pre-stop hook" in caplog.text
    assert "the workspace upload failed" in caplog.text


async def test_a_hook_that_hangs_blocks_the_stop(hub: HubDouble) -> None:
    async def stuck(user: str, server: str, reason: str) -> None:
        await asyncio.sleep(30)

    async with HubClient(hub.api_url, "t") as client:
        path = StopPath(client, [stuck], hook_timeout_seconds=0.1)
        assert await path.stop("alice", "", "quota") == "blocked"
    assert deletes(hub) == []
    assert counter(path.registry, "dolab_server_stop_blocked_total", "quota") == 1


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        pytest.param(202, "stopped", id="pending"),
        pytest.param(404, "gone", id="gone"),
        pytest.param(500, "failed", id="error"),
    ],
)
async def test_the_hub_answer_decides_the_outcome(hub: HubDouble, status: int, outcome: str) -> None:
    hub.respond = lambda method, path, query, body: (
        status,
        {"status": status, "message": "x"} if status >= 400 else None,
    )
    async with HubClient(hub.api_url, "t") as client:
        path = StopPath(client)
        assert await path.stop("alice", "", "admin") == outcome
    assert counter(path.registry, "dolab_server_stops_total", "admin") == (1 if outcome == "stopped" else 0)


async def test_dry_run_and_bad_reasons(hub: HubDouble) -> None:
    async with HubClient(hub.api_url, "t") as client:
        assert await StopPath(client, dry_run=True).stop("alice", "", "idle") == "dry-run"
        with pytest.raises(ValueError, match="not one of idle, deadline, max_age, quota, admin"):
            await StopPath(client).stop("alice", "", "because")
    assert hub.requests == []
    assert STOP_REASONS == ("idle", "deadline", "max_age", "quota", "admin")


async def sample_hook(user: str, server: str, reason: str) -> None:
    """A pre-stop hook for load_hooks."""


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param("no-colon", "module.path:callable", id="no-colon"),
        pytest.param("no_such_module_x:hook", "cannot import no_such_module_x", id="no-module"),
        pytest.param("tests.test_culler_service:missing", "has no callable missing", id="no-attr"),
        pytest.param("tests.test_culler_service:REPO", "has no callable REPO", id="not-callable"),
    ],
)
def test_load_hooks_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_hooks([spec])
    assert load_hooks(["tests.test_culler_service:sample_hook"]) == [sample_hook]


# ----- reading kernels -------------------------------------------------------------------------------------


@pytest.fixture
def servers() -> Iterator[HubDouble]:
    """Single-user servers' API: ``/user/NAME/api/kernels``."""
    with serve_hub_double() as double:
        yield double


def kernels(*states: str) -> list[dict]:
    return [{"id": f"k{i}", "execution_state": s, "connections": 0} for i, s in enumerate(states)]


async def test_read_busy_kernels_counts_busy_ones_directly(servers: HubDouble) -> None:
    servers.respond = lambda method, path, query, body: (200, kernels("busy", "idle", "busy", "starting"))
    http = AsyncHTTPClient(force_instance=True)
    try:
        assert await read_busy_kernels(http, f"{servers.url}/user/alice/", "culler-token", 5) == 2
    finally:
        http.close()
    (request,) = servers.requests
    assert request["path"] == "/user/alice/api/kernels"
    assert request["query"] == {"no_track_activity": ["1"]}, "the read must not count as the user's activity"
    assert request["headers"]["Authorization"] == "token culler-token"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        pytest.param((403, {"message": "no"}), "HTTP 403 from api/kernels", id="forbidden"),
        pytest.param((500, None), "HTTP 500 from api/kernels", id="error"),
        pytest.param((302, None), "HTTP 302", id="redirect-not-followed"),
        pytest.param((200, b"<html>"), "did not answer JSON", id="html"),
        pytest.param((200, {"kernels": []}), "did not answer a list", id="not-a-list"),
    ],
)
async def test_read_busy_kernels_errors(servers: HubDouble, answer: tuple, message: str) -> None:
    servers.respond = lambda method, path, query, body: answer
    http = AsyncHTTPClient(force_instance=True)
    try:
        with pytest.raises(InspectionError, match=message):
            await read_busy_kernels(http, f"{servers.url}/user/alice/", "t", 5)
    finally:
        http.close()


async def test_read_busy_kernels_gives_up_in_time(servers: HubDouble) -> None:
    servers.respond = lambda method, path, query, body: (200, kernels("busy"))
    servers.delay_seconds = 3
    http = AsyncHTTPClient(force_instance=True)
    try:
        began = time.monotonic()
        with pytest.raises(InspectionError, match=r"no answer in 0\.5 s"):
            await read_busy_kernels(http, f"{servers.url}/user/alice/", "t", 0.5)
        assert time.monotonic() - began < 2
        with pytest.raises(InspectionError, match="no answer"):
            await read_busy_kernels(http, unused_url() + "/user/alice/", "t", 2)
        with pytest.raises(InspectionError, match="no server_url"):
            await read_busy_kernels(http, "", "t", 2)
    finally:
        http.close()


# ----- sweeps ----------------------------------------------------------------------------------------------

#: Every server: idle after 60 s, warned 30 s before; the user "exempt" and the group "staff" are exempt.
POLICY = CullPolicy(
    rules=(Rule(idle_seconds=60),),
    warn_before_seconds=30,
    exempt_users=frozenset({"exempt"}),
    exempt_groups=frozenset({"staff"}),
)


class Lab:
    """A hub double listing ``users``, and single-user server doubles answering their kernels."""

    def __init__(self, hub: HubDouble, servers: HubDouble) -> None:
        self.hub, self.servers = hub, servers
        self.users: list[dict] = []
        self.kernels: dict[str, list[dict]] = {}  # user -> api/kernels answer
        self.hang: set[str] = set()
        self.kernel_reads: list[str] = []
        self.minted: list[str] = []
        self.refused_tokens: set[str] = set()
        self.revoked: list[str] = []
        hub.respond = self.hub_answer
        servers.respond = self.server_answer

    def url(self, user: str) -> str:
        return f"{self.servers.url}/user/{user}/"

    def add(self, name: str, groups: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("server_url", self.url(name))
        self.users.append(user_model(name, {"": server_model(**kwargs)}, groups))
        self.kernels.setdefault(name, kernels("idle"))

    def hub_answer(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        if path.endswith("/tokens") and method == "POST":  # a token for one server, owned by its user
            name = path.split("/")[4]
            assert body["scopes"] == [f"access:servers!server={name}/"], body
            self.minted.append(name)
            return 201, {"token": server_token(name, len(self.minted)), "id": f"a{len(self.minted)}"}
        if "/tokens/" in path and method == "DELETE":
            self.revoked.append(path.split("/")[4])
            return 204, None
        if method == "GET" and path == "/hub/api/users":
            return 200, {"items": self.users, "_pagination": {"offset": 0, "limit": 200, "total": len(self.users)}}
        if method == "GET" and path.startswith("/hub/api/users/"):
            name = path.rsplit("/", 1)[1]
            found = [u for u in self.users if u["name"] == name]
            return (200, found[0]) if found else (404, {"status": 404, "message": "Not found"})
        if method == "POST":
            return 200, None
        if method == "DELETE":
            name = path.split("/")[4]
            for user in self.users:
                if user["name"] == name:
                    user["servers"].pop("", None)
            return 204, None
        return 404, {"status": 404, "message": "Not found"}

    def server_answer(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        user = path.split("/")[2]
        sent = next(r for r in reversed(self.servers.requests) if r["path"] == path)["headers"].get("Authorization", "")
        if not sent.startswith(f"token {server_token(user, 0)[:-1]}"):  # only a token minted for this server
            return 403, {"message": "Forbidden"}
        if sent.removeprefix("token ") in self.refused_tokens:  # its owner revoked it on her token page
            return 403, {"message": "Forbidden"}
        self.kernel_reads.append(user)
        if user in self.hang:
            time.sleep(3)
        return 200, self.kernels[user]

    def activity_posts(self) -> list[str]:
        return [r["path"].split("/")[4] for r in self.hub.requests if r["path"].endswith("/activity")]

    def stops(self) -> list[str]:
        return [r["path"].split("/")[4] for r in self.hub.requests if r["path"].endswith("/server")]


def server_token(user: str, number: int) -> str:
    """The token the hub double mints for ``user``'s default server (the ``number``-th minted)."""
    return f"server-token-{user}-{number}"


@pytest.fixture
def lab(hub: HubDouble, servers: HubDouble) -> Lab:
    return Lab(hub, servers)


def sweeper(
    lab: Lab, client: HubClient, telemetry: StaticTelemetry | None = None, policy: CullPolicy = POLICY, **kwargs: Any
) -> Sweeper:
    return Sweeper(
        client,
        policy,
        telemetry or StaticTelemetry(),
        StopPath(client),
        ServerTokens(client, "test"),
        kernel_timeout_seconds=kwargs.pop("kernel_timeout_seconds", 1),
        **kwargs,
    )


async def test_a_sweep_reads_only_servers_near_their_timeout_and_acts(lab: Lab) -> None:
    lab.add("fresh", last_activity=ago(5))  # far from its idle stop: not read at all
    lab.add("idle", last_activity=ago(90))  # past it, idle kernels: stopped
    lab.add("busy", last_activity=ago(90))  # past it, a busy kernel: activity recorded, kept
    lab.kernels["busy"] = kernels("idle", "busy")
    lab.add("soon", last_activity=ago(45))  # 15 s from its stop: warned
    lab.add("exempt", last_activity=ago(600))
    lab.add("staffer", groups=["staff"], last_activity=ago(600))
    async with HubClient(lab.hub.api_url, "t") as client:
        culler = sweeper(lab, client)
        report = await culler.sweep()
        culler.close()
    assert sorted(lab.kernel_reads) == ["busy", "idle", "soon"]
    assert lab.stops() == ["idle"]
    assert lab.activity_posts() == ["busy"]
    post = next(r for r in lab.hub.requests if r["path"].endswith("/activity"))
    stamp = post["body"]["servers"][""]["last_activity"]
    assert post["body"]["last_activity"] == stamp
    assert abs((parse_time(stamp) - datetime.now(timezone.utc)).total_seconds()) < 5  # type: ignore[operator]
    (warning,) = culler.warnings_for("soon")
    assert warning.reason == "idle" and "has been idle and stops at" in warning.message()
    assert culler.warnings_for("busy") == []
    assert (report.servers, report.inspected, report.stopped, report.active, report.warned) == (6, 3, 1, 1, 1)
    # The list is asked for with the server states, ready servers only, in pages.
    listing = lab.hub.requests[0]
    assert listing["path"] == "/hub/api/users" and listing["query"]["state"] == ["ready"]


async def test_an_unreadable_server_is_kept_and_does_not_hold_up_the_others(lab: Lab) -> None:
    lab.add("hung", last_activity=ago(90))
    lab.hang.add("hung")
    lab.add("gone", last_activity=ago(90), server_url=unused_url() + "/user/gone/")
    lab.add("nourl", last_activity=ago(90), server_url="")
    for i in range(4):
        lab.add(f"idle{i}", last_activity=ago(90))
    async with HubClient(lab.hub.api_url, "t") as client:
        culler = sweeper(lab, client, kernel_timeout_seconds=2)
        began = time.monotonic()
        report = await culler.sweep(wait_seconds=1.5)
        took = time.monotonic() - began
        assert sorted(lab.stops()) == ["idle0", "idle1", "idle2", "idle3"]
        assert took < 2.5 and report.unfinished == 1, "the sweep waits at most its limit for a hung server"
        # The next sweep skips the server still being read, and the hung read ends as "unknown": kept.
        again = await culler.sweep(wait_seconds=0.5)
        assert again.skipped == 1
        await asyncio.sleep(2.5)
        culler.close()
    assert sorted(lab.stops()) == ["idle0", "idle1", "idle2", "idle3"], "unknown is not idle"
    assert report.unreadable == 3, "the hung server, once given up on, counts in the sweep that started it"


async def test_concurrency_caps_the_kernel_reads(lab: Lab, servers: HubDouble) -> None:
    for i in range(8):
        lab.add(f"u{i}", last_activity=ago(45))
    servers.delay_seconds = 0.3
    async with HubClient(lab.hub.api_url, "t") as client:
        culler = sweeper(lab, client, concurrency=3)
        await culler.sweep()
        culler.close()
    assert len(lab.kernel_reads) == 8
    assert servers.max_in_flight == 3


async def test_a_busy_gpu_is_work_and_read_for_every_gpu_server(lab: Lab) -> None:
    other = {**SLOT, "uuid": "GPU-bbbb", "index": 1}
    lab.add("trainer", profile="a100", slots=[SLOT], last_activity=ago(5))  # far from its timeout
    lab.add("quiet", profile="a100", slots=[other], last_activity=ago(90))
    telemetry = StaticTelemetry({"GPU-aaaa": 97, "GPU-bbbb": 3})
    async with HubClient(lab.hub.api_url, "t") as client:
        culler = sweeper(lab, client, telemetry)
        await culler.sweep()
        culler.close()
    assert telemetry.calls == [["GPU-aaaa", "GPU-bbbb"]], "one telemetry call per sweep for every GPU server"
    assert lab.kernel_reads == ["quiet"], "a server far from its timeout has its kernels left alone"
    assert lab.activity_posts() == ["trainer"]
    assert lab.stops() == ["quiet"]


async def test_failing_telemetry_falls_back_to_kernels(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(StaticTelemetry):
        async def gpu_percent(self, slots: Any) -> dict[str, float]:
            raise OSError("NVML exploded")

    lab.add("gpu", profile="a100", slots=[SLOT], last_activity=ago(90))
    lab.kernels["gpu"] = kernels("busy")
    async with HubClient(lab.hub.api_url, "t") as client:
        culler = sweeper(lab, client, Broken())
        await culler.sweep()
        culler.close()
    assert lab.stops() == [] and lab.activity_posts() == ["gpu"]
    assert "Cannot read GPU use (NVML exploded)" in caplog.text


async def test_deadline_warns_then_stops_even_a_busy_exempt_server(lab: Lab) -> None:
    soon = datetime.now(timezone.utc) + timedelta(seconds=20)
    lab.add("exempt", stop_at=format_time(soon), last_activity=ago(1))
    lab.kernels["exempt"] = kernels("busy")
    async with HubClient(lab.hub.api_url, "t") as client:
        culler = sweeper(lab, client)
        await culler.sweep()
        (warning,) = culler.warnings_for("exempt")
        assert (warning.reason, warning.stop_at) == ("deadline", soon.replace(microsecond=0))
        assert warning.to_json()["message"].startswith("Your default server stops at")
        lab.users[0]["servers"][""]["state"]["stop_at"] = ago(1)
        await culler.sweep()
        culler.close()
    assert lab.stops() == ["exempt"]
    assert culler.warnings_for("exempt") == []


async def test_kernels_are_read_with_a_token_for_that_server_only(lab: Lab) -> None:
    lab.add("alice", last_activity=ago(90))
    lab.add("bob", last_activity=ago(90))
    lab.kernels["alice"] = lab.kernels["bob"] = kernels("busy")
    async with HubClient(lab.hub.api_url, "culler-token") as client:
        culler = sweeper(lab, client)
        await culler.sweep()
        # The servers never see the culler's own token; each sees a token minted for it, owned by its user.
        seen = {r["headers"]["Authorization"] for r in lab.servers.requests}
        assert seen == {f"token {server_token('alice', 1)}", f"token {server_token('bob', 2)}"} or seen == {
            f"token {server_token('alice', 2)}",
            f"token {server_token('bob', 1)}",
        }
        # The next sweep reuses them; one its owner revoked is replaced, and the read still succeeds.
        minted = len(lab.minted)
        await culler.sweep()
        assert len(lab.minted) == minted
        lab.refused_tokens.add(lab.servers.requests[-1]["headers"]["Authorization"].removeprefix("token "))
        report = await culler.sweep()
        assert len(lab.minted) == minted + 1 and report.unreadable == 0 and lab.stops() == []
        # A server that is gone has its token revoked.
        lab.users = [u for u in lab.users if u["name"] != "alice"]
        before = len(lab.revoked)
        await culler.sweep()
        assert lab.revoked[before:] == ["alice"]
        culler.close()


async def test_dry_run_changes_nothing(lab: Lab) -> None:
    lab.add("idle", last_activity=ago(90))
    lab.add("busy", last_activity=ago(90))
    lab.kernels["busy"] = kernels("busy")
    async with HubClient(lab.hub.api_url, "t") as client:
        tokens = ServerTokens(client, "test")
        culler = Sweeper(client, POLICY, StaticTelemetry(), StopPath(client, dry_run=True), tokens, dry_run=True)
        await culler.sweep()
        culler.close()
    # Kernels are still read (with tokens minted for those servers), but no activity is recorded, nothing stopped.
    assert [r["method"] for r in lab.hub.requests if not r["path"].endswith("/tokens")] == ["GET"]
    assert sorted(lab.kernel_reads) == ["busy", "idle"]


async def test_extend_and_keep_alive(lab: Lab, tmp_path: Path) -> None:
    stop_at = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(minutes=5)
    lab.add("alice", stop_at=format_time(stop_at), last_activity=ago(45))
    lab.add("bob", last_activity=ago(45))
    store = ExtensionStore(tmp_path / "ext.json")
    async with HubClient(lab.hub.api_url, "t") as client:
        culler = sweeper(lab, client, max_run_hours=24, extensions=store)
        await culler.sweep()
        assert {w.reason for w in culler.warnings_for("alice")} == {"idle"}
        new = await culler.extend("alice", "", 2)
        assert new == stop_at + timedelta(hours=2)
        assert await culler.extend("alice", "", 1) == stop_at + timedelta(hours=3), "from the extended time"
        (view,) = await culler.servers_of("alice")
        assert view.stop_at == new + timedelta(hours=1) and view.label == "Default server"
        assert 20.8 < view.headroom_hours < 21  # type: ignore[operator]
        with pytest.raises(ValueError, match="at most 24 hours from now"):
            await culler.extend("alice", "", 22)
        with pytest.raises(ValueError, match="You have no running server 'gpu'"):
            await culler.extend("alice", "gpu", 1)
        with pytest.raises(ValueError, match="You have no running default server"):
            await culler.extend("nobody", "", 1)
        with pytest.raises(ValueError, match="no stop time to extend"):
            await culler.extend("bob", "", 1)
        await culler.keep_alive("alice", "")
        assert culler.warnings_for("alice") == [], "keeping it alive clears the idle warning"
        # The next sweep uses the extended stop time, and a restarted culler still knows it.
        await culler.sweep()
        culler.close()
    assert lab.activity_posts() == ["alice"]
    assert ExtensionStore(tmp_path / "ext.json").get("alice", "", T0) == stop_at + timedelta(hours=3)


# ----- the page and API ------------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="function")
async def web(lab: Lab) -> Any:
    """The culler's tornado app on a free port; tokens ``alice-token`` (user), ``root-token`` (an admin's, with
    DO-LAB's stop scope) and ``narrow-token`` (an admin's, limited to the culler's page: the admin flag alone)."""
    from jupyterhub.services.auth import HubOAuth
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port

    from dolab_services.culler.web import make_app

    identities = {
        "alice-token": {"kind": "user", "name": "alice", "admin": False, "groups": [], "scopes": [USER_SCOPE]},
        "root-token": {"kind": "user", "name": "root", "admin": True, "groups": [], "scopes": [USER_SCOPE, STOP]},
        "narrow-token": {"kind": "user", "name": "root", "admin": True, "groups": [], "scopes": [USER_SCOPE]},
        "eve-token": {"kind": "user", "name": "eve", "admin": False, "groups": [], "scopes": []},
    }
    users_answer = lab.hub_answer

    def answer(method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        if path == "/hub/api/user":
            asked = [r for r in lab.hub.requests if r["path"] == "/hub/api/user"]
            token = asked[-1]["headers"].get("Authorization", "").split()[-1]
            return (200, identities[token]) if token in identities else (403, {"status": 403, "message": "no"})
        return users_answer(method, path, query, body)

    lab.hub.respond = answer
    stop_at = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=20)
    lab.add("alice", stop_at=format_time(stop_at), last_activity=ago(1))
    client = HubClient(lab.hub.api_url, "culler-token")
    culler = sweeper(lab, client, max_run_hours=24)
    await culler.sweep()
    auth = HubOAuth(
        api_url=lab.hub.api_url,
        api_token="culler-token",
        oauth_client_id="service-dolab-culler",
        base_url="/services/dolab-culler/",
        access_scopes={USER_SCOPE},
        cache_max_age=0,
    )
    app = make_app(culler, "/services/dolab-culler/", hub_auth=auth)
    sock, port = bind_unused_port()
    server = HTTPServer(app)
    server.add_sockets([sock])
    base = f"http://127.0.0.1:{port}/services/dolab-culler/"

    def call(method: str, path: str, token: str = "alice-token", **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"token {token}"} if token else {}
        return requests.request(method, base + path, headers=headers, timeout=10, allow_redirects=False, **kwargs)

    async def run(method: str, path: str, token: str = "alice-token", **kwargs: Any) -> requests.Response:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: call(method, path, token, **kwargs))

    yield run, stop_at
    server.stop()
    culler.close()
    client.close()


async def test_api_warnings_extend_and_stop(web: Any, lab: Lab) -> None:
    run, stop_at = web
    reply = await run("GET", "api/warnings")
    assert reply.status_code == 200
    (warning,) = reply.json()["warnings"]
    assert warning["reason"] == "deadline" and warning["stop_at"] == format_time(stop_at)
    assert warning["extend_hours"] == 2, "what the notice's one click extends by"
    assert (await run("GET", "api/warnings", "root-token")).json() == {"warnings": []}

    reply = await run("POST", "api/extend", json={"server": "", "hours": 30})
    assert reply.status_code == 400 and "at most 24 hours from now" in reply.json()["message"]
    reply = await run("POST", "api/extend", json={"server": "", "hours": 1, "user": "bob"})
    assert reply.status_code == 403 and reply.json()["message"].startswith("You can only change your own servers")
    for hours in (10**400, -5, "1", True, None, 0, 1e6):
        reply = await run("POST", "api/extend", data=json.dumps({"server": "", "hours": hours}))
        assert reply.status_code == 400 and reply.json()["message"].startswith("hours must be a number"), hours
    reply = await run("POST", "api/extend", data='{"server": "", "hours": NaN}')
    assert reply.status_code == 400 and "NaN is not a JSON number" in reply.json()["message"]
    reply = await run("POST", "api/extend", data="[" * 100_000 + "]" * 100_000)
    assert reply.status_code == 400 and reply.json()["message"] == "The body is nested too deeply."
    reply = await run("POST", "api/extend", data="[1]")
    assert reply.status_code == 400 and "JSON object" in reply.json()["message"]
    reply = await run("POST", "api/extend", json={"server": "", "hours": 1})
    assert reply.status_code == 200
    assert reply.json() == {"user": "alice", "server": "", "stop_at": format_time(stop_at + timedelta(hours=1))}
    assert (await run("GET", "api/warnings")).json() == {"warnings": []}, "the deadline warning went"

    reply = await run("POST", "api/stop", json={"user": "alice", "server": ""})
    assert reply.status_code == 403 and "custom:dolab:stop-servers" in reply.json()["message"]
    reply = await run("POST", "api/stop", "narrow-token", json={"user": "alice", "server": ""})
    assert reply.status_code == 403, "the admin flag without the scope stops nothing"
    reply = await run("POST", "api/stop", "root-token", json={"user": "alice", "server": ""})
    assert reply.status_code == 200 and reply.json()["result"] == "stopped"
    assert lab.stops() == ["alice"]


async def test_lab_session_hands_the_notice_what_it_needs(web: Any) -> None:
    run, _ = web
    reply = await run("GET", "lab-session")
    assert reply.status_code == 200 and reply.headers["Cache-Control"] == "no-store"
    script = BeautifulSoup(reply.text, "html.parser").find("script", id="dolab-culler-session")
    assert script is not None and script["type"] == "application/json"
    session = json.loads(script.string)
    assert session["user"] == "alice" and session["xsrf"]
    assert session["poll_seconds"] == 60 and session["page"] == "/services/dolab-culler/"
    # Loaded in a frame without the service's cookie, it sends the browser through the hub's login (OAuth).
    login = await run("GET", "lab-session", "")
    assert login.status_code == 302 and "/oauth2/authorize" in login.headers["Location"]


async def test_api_needs_a_user_with_access(web: Any) -> None:
    run, _ = web
    assert (await run("GET", "api/warnings", "")).status_code == 403
    assert (await run("GET", "api/warnings", "eve-token")).status_code == 403, "no access:services scope"
    assert (await run("POST", "api/extend", "", json={"server": "", "hours": 1})).status_code == 403


async def test_the_page_shows_stop_time_warning_and_button(web: Any) -> None:
    run, stop_at = web
    reply = await run("GET", "")
    assert reply.status_code == 200
    soup = BeautifulSoup(reply.text, "html.parser")
    section = soup.find("section", attrs={"data-server": ""})
    assert section.find("time")["datetime"] == format_time(stop_at)
    assert section.find(class_="warning")["data-reason"] == "deadline"
    form = section.find("form", class_="extend")
    fields = {i["name"]: i["value"] for i in form.find_all("input")}
    assert fields == {"_xsrf": fields["_xsrf"], "action": "extend", "server": "", "hours": "2"}
    assert form.find("button").text == "Extend by 2 hours"
    assert section.find("form", class_="keepalive") is None, "only idle warnings offer a keep-alive"
    clicked = await run("POST", "", data=fields)
    assert clicked.status_code == 200
    assert "now stops at " + format_time(stop_at + timedelta(hours=2)) in clicked.text
    refused = await run("POST", "", data={**fields, "hours": "100"})
    assert refused.status_code == 400
    assert "at most 24 hours" in BeautifulSoup(refused.text, "html.parser").find(class_="error").text
    # No login: a browser is sent to the hub's login, an API client is refused.
    assert (await run("GET", "", "")).status_code == 302


async def test_metrics(web: Any) -> None:
    run, _ = web
    reply = await run("GET", "metrics", "")
    assert reply.status_code == 200
    names = {s.name for f in text_string_to_metric_families(reply.text) for s in f.samples}
    assert {"dolab_server_stops_total", "dolab_server_stop_blocked_total"} <= names


# ----- registration and the command ------------------------------------------------------------------------


def test_culler_service_defaults() -> None:
    found = culler_service(Config(), {}, "/py", "/data")
    assert found is not None
    assert found.service == {
        "name": "dolab-culler",
        "command": [
            "/py",
            "-m",
            "dolab_services.culler",
            "--interval",
            "60",
            "--max-run-hours",
            "168",
            "--extensions-file",
            "/data/culler-extensions.json",
        ],
        "url": "http://127.0.0.1:10101",
        "environment": {},
        "oauth_no_confirm": True,
        # An admin's browser token carries DO-LAB's scopes the culler checks (the admin flag alone allows nothing).
        "oauth_client_allowed_scopes": ["custom:dolab:stop-servers", "custom:dolab:extend-servers"],
        "info": found.service["info"],
    }
    assert found.role == {
        "name": "dolab-culler",
        "description": found.role["description"],
        "scopes": list(CULLER_SCOPES),
        "services": ["dolab-culler"],
    }
    assert found.extra_user_scopes == {"access:services!service=dolab-culler"}


def test_culler_service_from_env_and_config(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"rules": [{"profile": "cpu", "idle_hours": 2}]}))
    c = Config()
    c.DoLabSpawner.max_run_hours = 24
    c.JupyterHub.extra_user_scopes = {"read:metrics"}
    env = {
        "DOLAB_CULLER_INTERVAL": "15",
        "DOLAB_CULLER_POLICY": str(policy),
        "DOLAB_CULLER_TELEMETRY": "file:/run/gpu.json",
        "DOLAB_CULLER_PORT": "9999",
        "DOLAB_MAX_RUN_HOURS": "48",
    }
    found = culler_service(c, env, "/py")
    assert found is not None
    assert found.service["command"][3:] == [
        "--interval",
        "15",
        "--max-run-hours",
        "24",
        "--policy",
        str(policy),
        "--telemetry",
        "file:/run/gpu.json",
    ]
    assert found.service["url"] == "http://127.0.0.1:9999"
    assert found.extra_user_scopes == {"read:metrics", USER_SCOPE}


def test_culler_service_gets_the_spawners_plans() -> None:
    plans = {"plans": {"staff": {"profiles": "*", "cull_exempt": True}}, "groups": {"lab-staff": "staff"}}
    c = Config()
    c.DoLabSpawner.plans = plans
    found = culler_service(c, {}, "/py")
    assert found is not None
    table = plans_from_env(found.service["environment"])
    assert table.plan_for(["lab-staff"]).cull_exempt
    assert not table.plan_for(["students"]).cull_exempt
    assert culler_service(Config(), {"DOLAB_MAX_RUN_HOURS": "48"}, "/py").service["command"][6] == "48"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"DOLAB_CULLER_INTERVAL": "soon"}, "must be a number", id="interval-text"),
        pytest.param({"DOLAB_CULLER_INTERVAL": "0"}, "positive number of seconds", id="interval-zero"),
        pytest.param({"DOLAB_CULLER_PORT": "70000"}, "TCP port", id="port"),
        pytest.param(
            {"DOLAB_CULLER_POLICY": "/nonexistent/policy.json"}, "Cannot read the culler policy", id="no-file"
        ),
    ],
)
def test_culler_service_errors(env: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        culler_service(Config(), env, "/py")


def test_culler_service_bad_policy_content(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"rules": [{"idle_minutes": 5}]}))
    with pytest.raises(ValueError, match=r"rules\[0\] must be a dict with keys among"):
        culler_service(Config(), {"DOLAB_CULLER_POLICY": str(policy)}, "/py")


def test_culler_service_leaves_an_admins_own_alone() -> None:
    c = Config()
    c.JupyterHub.services = [{"name": "dolab-culler", "command": ["mine"]}]
    assert culler_service(c, {}, "/py") is None


def test_shipped_config_registers_the_culler_after_the_overlays(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data_dir = isolate_env(monkeypatch, tmp_path)
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    (overlays / "10-limits.py").write_text("c.DoLabSpawner.max_run_hours = 12\n")
    monkeypatch.setenv("DOLAB_CONFIG_DIR", str(overlays))
    c = PyFileConfigLoader("jupyterhub_config.py", path=str(REPO)).load_config()
    services = {s["name"]: s for s in c.JupyterHub.services}
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    culler = services["dolab-culler"]
    assert culler["command"][:3] == [sys.executable, "-m", "dolab_services.culler"]
    assert culler["command"][5:7] == ["--max-run-hours", "12"]
    command = culler["command"]
    assert command[command.index("--extensions-file") + 1] == str(data_dir / "culler-extensions.json")
    assert roles["dolab-culler"]["scopes"] == list(CULLER_SCOPES)
    assert USER_SCOPE in c.JupyterHub.extra_user_scopes, "every user may open the culler's page"
    assert "dolab-cli" in services


def test_the_flags() -> None:
    app = Culler()
    app.initialize(
        [
            "--interval=5",
            "--concurrency=3",
            "--telemetry=file:/x.json",
            "--max-run-hours=12",
            "--pre-stop-hook=a.b:c",
            "--pre-stop-hook=d.e:f",
            "--dry-run",
        ]
    )
    assert (app.interval_seconds, app.concurrency, app.telemetry, app.max_run_hours) == (5, 3, "file:/x.json", 12)
    assert app.pre_stop_hooks == ["a.b:c", "d.e:f"]
    assert app.dry_run is True


def test_max_run_hours_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOLAB_MAX_RUN_HOURS", "36")
    app = Culler()
    app.initialize([])
    assert app.max_run_hours == 36


def command_env(hub_url: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "DOLAB_"))}
    if hub_url:
        env.update(JUPYTERHUB_API_URL=hub_url, JUPYTERHUB_API_TOKEN="culler-token")
    return env


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--interval", "0"], "--interval must be a positive number", id="zero-interval"),
        pytest.param(["--policy", "/nonexistent.json"], "Cannot read the culler policy", id="no-policy"),
        pytest.param(["--telemetry", "file:"], "names no file", id="bad-telemetry"),
        pytest.param(["--pre-stop-hook", "nope"], "module.path:callable", id="bad-hook"),
        pytest.param([], "JUPYTERHUB_API_URL", id="no-hub"),
    ],
)
def test_the_command_refuses_bad_settings(args: list[str], message: str) -> None:
    env = command_env("http://127.0.0.1:1/hub/api" if args else "")
    command = [sys.executable, "-m", "dolab_services.culler", "--once", *args]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("dolab-culler: ") and message in done.stderr
    assert "Traceback" not in done.stderr


def test_the_command_sweeps_once(lab: Lab) -> None:
    lab.add("idle", last_activity=ago(3 * 86400))
    command = [sys.executable, "-m", "dolab_services.culler", "--once", "--telemetry", "file:/nonexistent.json"]
    done = subprocess.run(
        command, env=command_env(lab.hub.api_url), cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Stopped server idle/, reason idle" in done.stderr
    assert lab.stops() == ["idle"]


def test_the_command_reports_an_unreadable_hub() -> None:
    command = [sys.executable, "-m", "dolab_services.culler", "--once"]
    done = subprocess.run(
        command, env=command_env(unused_url() + "/hub/api"), cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "Cannot list the hub's servers" in done.stderr


def test_a_taken_port_leaves_the_page_off_but_culling_on(lab: Lab) -> None:
    lab.add("idle", last_activity=ago(3 * 86400))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **command_env(lab.hub.api_url),
            "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{taken.getsockname()[1]}",
            "JUPYTERHUB_SERVICE_PREFIX": "/services/dolab-culler/",
            "JUPYTERHUB_CLIENT_ID": "service-dolab-culler",
        }
        command = [sys.executable, "-m", "dolab_services.culler", "--interval", "0.5", "--telemetry", "file:/x.json"]
        with pytest.raises(subprocess.TimeoutExpired) as ended:
            subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=6)
    stderr = ended.value.stderr
    stderr = stderr.decode() if isinstance(stderr, bytes) else stderr or ""
    assert "the page and API are off, sweeps go on" in stderr
    assert "Stopped server idle/, reason idle" in stderr
    assert lab.stops() == ["idle"]
