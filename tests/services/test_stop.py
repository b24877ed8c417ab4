"""Tests for :mod:`dolab_services.stop`: the one stop path (pre-stop hooks, then the hub API), its outcomes and
metrics, and the hook loader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from dolab_services.hubclient import HubClient
from dolab_services.stop import STOP_REASONS, StopPath, load_hooks
from tests.hub_double import HubDouble, serve_hub_double


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
        pytest.param("tests.services.test_stop:missing", "has no callable missing", id="no-attr"),
        pytest.param("tests.culler.support:REPO", "has no callable REPO", id="not-callable"),
    ],
)
def test_load_hooks_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_hooks([spec])
    assert load_hooks(["tests.services.test_stop:sample_hook"]) == [sample_hook]
