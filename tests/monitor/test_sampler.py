"""The monitor's tick against a hub double: readings mapped to servers, bookings, warnings and quota stops.

The hub is tests/hub_double.py (a real HTTP server on loopback); the ledger a SQLite file; GPU readings a static
source; stops go through the shared StopPath (dolab_services.stop), with a pre-stop hook that records the order of
events.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dolab_services.hubclient import HubClient
from dolab_services.monitor.enforcer import QuotaEnforcer
from dolab_services.monitor.ledger import AsyncLedger, UsageLedger
from dolab_services.monitor.metrics import MonitorMetrics
from dolab_services.monitor.quotas import QuotaConfig
from dolab_services.monitor.runs import GpuPrices
from dolab_services.monitor.sampler import Monitor
from dolab_services.monitor.telemetry import GpuProcess, GpuReading, StaticSource
from dolab_services.stop import StopPath

from ..hub_double import HubDouble, serve_hub_double, users_api

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
GPU_A, GPU_B = "GPU-aaaa", "GPU-bbbb"
A100 = "NVIDIA A100 80GB"


def stamp(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def server(started: datetime, **state: Any) -> dict[str, Any]:
    return {"started": stamp(started), "ready": True, "state": state, "user_options": {}}


USERS = [
    {  # one local A100 for 55 min: 0.917 of a 1 GPU-hour daily quota -> warned
        "name": "alice",
        "groups": ["team"],
        "servers": {
            "": server(
                NOW - timedelta(minutes=55),
                backend="local",
                profile="a100",
                host="local",
                slots=[{"uuid": GPU_A, "index": 0, "name": A100, "host": "local"}],
            )
        },
    },
    {  # a RunPod pod at 3 USD/h for 2 h: 6 USD of a 5 USD daily quota -> stopped
        "name": "bob",
        "groups": [],
        "servers": {
            "": server(
                NOW - timedelta(hours=2),
                backend="runpod",
                profile="rp",
                slots=[],
                price_per_hour_usd=3.0,
                gpu_type="RTX 4090",
                gpu_count=1,
                gpu_utilization_percent=77,
            )
        },
    },
    {  # a CPU server: over its (zero) quota, but it uses nothing a quota counts -> kept
        "name": "carol",
        "groups": [],
        "servers": {"": server(NOW - timedelta(hours=5), backend="local", profile="cpu", slots=[])},
    },
]
QUOTAS = {
    "groups": {"team": {"gpu_hours": {"day": 1}}},
    "users": {"bob": {"usd": {"day": 5}}},
    "default": {"usd": {"month": 0}},
}


def respond_with_stops(hub: HubDouble) -> None:
    listing = users_api(USERS, page_size=2)

    def respond(method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if method == "DELETE":
            return 204, None
        return listing(method, path, query, body)

    hub.respond = respond


@pytest.fixture
def hub() -> Iterator[HubDouble]:
    with serve_hub_double() as double:
        respond_with_stops(double)
        yield double


def make_monitor(hub: HubDouble, path: Path, hooks: list[Any], readings: list[GpuReading]) -> Monitor:
    client = HubClient(hub.api_url, "monitor-token")
    metrics = MonitorMetrics()
    stop_path = StopPath(client, hooks, registry=metrics.registry, hook_timeout_seconds=5)
    return Monitor(
        client,
        AsyncLedger(UsageLedger(f"sqlite:///{path}")),
        StaticSource(readings),
        QuotaEnforcer(stop_path, warn_fraction=0.9),
        quotas=QuotaConfig.from_config(QUOTAS),
        prices=GpuPrices({"A100": 1.2}),
        metrics=metrics,
    )


READINGS = [
    GpuReading(
        GPU_A,
        index=0,
        name=A100,
        utilization_percent=93,
        memory_used_gb=40,
        memory_total_gb=80,
        temperature_c=61,
        power_w=250,
        processes=(GpuProcess(4242, 39.5),),
    ),
    GpuReading(GPU_B, index=1, name=A100, utilization_percent=5, processes=(GpuProcess(999, 1.0),)),
]


def deletes(hub: HubDouble) -> list[str]:
    return [r["path"] for r in hub.requests if r["method"] == "DELETE"]


async def test_a_tick_books_warns_and_stops_through_the_stop_path(
    hub: HubDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[tuple[str, ...]] = []

    async def hook(user: str, name: str, reason: str) -> None:
        events.append(("hook", user, name, reason, str(len(deletes(hub)))))

    monitor = make_monitor(hub, tmp_path / "ledger.sqlite", [hook], READINGS)
    caplog.set_level(logging.INFO)
    report = await monitor.tick(NOW)
    await monitor.enforcer.drain()

    assert (report.servers, report.gpus_read, report.booked, report.quota_users) == (3, 2, 2, 2)
    # bob's pod is stopped for its quota, after the pre-stop hook ran (no DELETE before it); the others are not.
    assert events == [("hook", "bob", "", "quota", "0")]
    assert deletes(hub) == ["/hub/api/users/bob/server"]
    assert "Stopped server bob/, reason quota (usd per day: 6.00 USD of 5.00 USD, user bob)" in caplog.text
    # alice is warned once, with what remains and when it resets.
    [warning] = monitor.enforcer.warnings["alice"]
    assert warning.limit.metric == "gpu_hours" and warning.limit.period == "day"
    assert "You have used 92% of your quota" in warning.message()
    assert "resets Friday 2026-11-27 00:00 UTC" in warning.message()
    assert "Quota warning: alice has used 92% of gpu_hours per day" in caplog.text

    # The ledger: alice's 55 min at 1.2 USD/GPU-hour, bob's 2 h at 3 USD/h; carol's CPU server is not booked.
    usage = await monitor.ledger.period_usage(None, NOW)
    assert usage["alice"]["day"]["gpu_hours"] == pytest.approx(55 / 60)
    assert usage["alice"]["day"]["usd"] == pytest.approx(1.2 * 55 / 60)
    assert usage["bob"]["day"] == pytest.approx({"gpu_hours": 2.0, "usd": 6.0})
    assert "carol" not in usage

    # A second tick at the same instant books nothing more.
    again = await monitor.tick(NOW)
    await monitor.enforcer.drain()
    assert again.booked == 0
    assert (await monitor.ledger.period_usage(None, NOW))["bob"]["day"]["usd"] == pytest.approx(6.0)

    text = generate_latest(monitor.metrics.registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    gpu0 = (("gpu_type", A100), ("host", "local"), ("index", "0"))
    assert samples[("dolab_gpu_utilization_percent", gpu0)] == 93
    assert samples[("dolab_gpu_held", gpu0)] == 1
    assert samples[("dolab_gpu_held", (("gpu_type", A100), ("host", "local"), ("index", "1")))] == 0
    assert samples[("dolab_server_stops_total", (("reason", "quota"),))] >= 1
    assert samples[("dolab_spend_usd_per_hour", (("backend", "runpod"),))] == 3.0
    assert samples[("dolab_quota_users", (("state", "warned"),))] == 1
    assert not any(name.startswith("dolab_user_") for name, _ in samples), "per-user series are off by default"
    monitor.ledger.close()


async def test_a_pre_stop_hook_that_fails_keeps_the_server_until_the_next_tick(hub: HubDouble, tmp_path: Path) -> None:
    calls = []

    async def failing_sync(user: str, name: str, reason: str) -> None:
        calls.append(user)
        if len(calls) == 1:
            raise RuntimeError("the workspace could not be saved")

    monitor = make_monitor(hub, tmp_path / "ledger.sqlite", [failing_sync], READINGS)
    await monitor.tick(NOW)
    await monitor.enforcer.drain()
    assert deletes(hub) == []
    assert [s.outcome for s in monitor.enforcer.stops["bob"]] == ["blocked"]
    await monitor.tick(NOW + timedelta(seconds=15))
    await monitor.enforcer.drain()
    assert deletes(hub) == ["/hub/api/users/bob/server"]
    assert calls == ["bob", "bob"]
    monitor.ledger.close()


async def test_a_server_already_stopping_is_not_stopped_again(hub: HubDouble, tmp_path: Path) -> None:
    stopping = [dict(u, servers={"": {**u["servers"][""], "pending": "stop"}}) for u in USERS]
    hub.respond = users_api(stopping, page_size=10)
    monitor = make_monitor(hub, tmp_path / "ledger.sqlite", [], READINGS)
    report = await monitor.tick(NOW)
    await monitor.enforcer.drain()
    assert report.stops == 0 and deletes(hub) == []
    assert not (await monitor.quota_status("bob", now=NOW)).limits[0].remaining, "bob is over quota all the same"
    monitor.ledger.close()


async def test_views_map_gpus_to_their_holders(hub: HubDouble, tmp_path: Path) -> None:
    monitor = make_monitor(hub, tmp_path / "ledger.sqlite", [], READINGS)
    monitor.enforcer.enforce = False
    await monitor.tick(NOW)
    overview = await monitor.overview(NOW)
    rows = {g["uuid"]: g for g in overview["gpus"]}
    assert rows[GPU_A]["holder"] == "alice/" and rows[GPU_A]["processes"] == [{"pid": 4242, "memory_gb": 39.5}]
    assert rows[GPU_B]["holder"] == "" and rows[GPU_B]["unattributed_processes"] == 1
    assert overview["totals"]["servers"] == 3 and overview["totals"]["gpus_held"] == 1
    assert overview["totals"]["usd_per_hour"] == pytest.approx(1.2 + 3.0)
    assert overview["totals"]["day"]["usd"] == pytest.approx(6.0 + 1.1)

    alice = await monitor.user_view("alice", NOW)
    assert [s["server"] for s in alice["servers"]] == [""]
    assert alice["servers"][0]["utilization_percent"] == 93
    assert alice["servers"][0]["history"][0]["utilization_percent"] == 93
    assert alice["quota"]["allowed"] and alice["quota"]["source"] == "group team"
    assert alice["quota"]["limits"][0]["remaining"] == pytest.approx(5 / 60, abs=1e-6)
    assert alice["warnings"][0]["metric"] == "gpu_hours"
    bob = await monitor.user_view("bob", NOW)
    assert not bob["quota"]["allowed"] and "You can start a GPU server again" in bob["quota"]["message"]
    # A RunPod pod's GPU use comes from its state.
    assert bob["servers"][0]["utilization_percent"] == 77 and bob["servers"][0]["gpus"] == {"RTX 4090": 1}
    # A user with no running server: groups come from the hub.
    status = await monitor.quota_status("carol", now=NOW)
    assert status.quota.source == "default" and status.exceeded
    monitor.ledger.close()


async def test_per_user_metrics_only_when_enabled(hub: HubDouble, tmp_path: Path) -> None:
    monitor = make_monitor(hub, tmp_path / "ledger.sqlite", [], READINGS)
    monitor.metrics = MonitorMetrics(per_user=True)
    monitor.enforcer.enforce = False
    await monitor.tick(NOW)
    text = generate_latest(monitor.metrics.registry).decode()
    values = {
        (s.labels.get("user"), s.labels.get("period")): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "dolab_user_cost_usd"
        for s in family.samples
    }
    assert values[("bob", "day")] == pytest.approx(6.0)
    monitor.ledger.close()


async def test_a_failing_telemetry_source_only_leaves_readings_out(hub: HubDouble, tmp_path: Path) -> None:
    class Broken(StaticSource):
        async def read(self) -> list[GpuReading]:
            raise OSError("the GPU agent is down")

    monitor = make_monitor(hub, tmp_path / "ledger.sqlite", [], [])
    monitor.source = Broken()
    monitor.enforcer.enforce = False
    report = await monitor.tick(NOW)
    assert report.gpus_read == 0 and report.booked == 2
    rows = (await monitor.overview(NOW))["gpus"]
    assert [(g["uuid"], g["holder"], g["utilization_percent"]) for g in rows] == [(GPU_A, "alice/", None)]
    monitor.ledger.close()
