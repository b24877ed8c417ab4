"""Tests for :mod:`dolab_services.culler.sweeper`: sweeps on a hub double and single-user server doubles.

GPU use comes from the telemetry module's ``StaticTelemetry``. The real hub, proxy and servers are in
``tests/e2e/test_culler.py``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from dolab_core.times import format_time, parse_time
from dolab_services.culler.extensions import ExtensionStore
from dolab_services.culler.sweeper import Sweeper
from dolab_services.culler.telemetry import StaticTelemetry
from dolab_services.hubclient import HubClient
from dolab_services.servertokens import ServerTokens
from dolab_services.stop import StopPath

from ..cli_support import unused_url
from ..hub_double import HubDouble
from .support import POLICY, SLOT, T0, Lab, ago, kernels, server_token, sweeper


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
