"""Tests for :mod:`dolab_services.culler.facts`: a server's facts from its hub model and spawner state, and its
kernels read at its own address.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from tornado.httpclient import AsyncHTTPClient

from dolab_core.times import format_time, parse_time
from dolab_services.culler.facts import InspectionError, read_busy_kernels, server_facts
from dolab_services.culler.policy import ServerFacts

from ..cli_support import unused_url
from ..hub_double import HubDouble
from .support import NOW, SLOT, T0, kernels, server_model, user_model


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
