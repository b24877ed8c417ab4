"""Tests for :mod:`dolab_services.hubclient` against a real HTTP server on 127.0.0.1 playing the hub."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dolab_services.hubclient import PAGINATION_MEDIA_TYPE, HubAPIError, HubClient
from tests.cli_support import unused_url
from tests.hub_double import HubDouble, serve_hub_double, users_api

TOKEN = "s3cret-token-value"
USERS = [{"kind": "user", "name": name, "servers": {}} for name in ("alice", "bob", "carol")]


@pytest.fixture
def hub() -> Iterator[HubDouble]:
    with serve_hub_double() as double:
        yield double


def client(hub: HubDouble, **kwargs: Any) -> HubClient:
    return HubClient(hub.api_url, TOKEN, **kwargs)


async def all_users(api: HubClient, state: str | None = "active") -> list[str]:
    async with api:
        return [user["name"] async for user in api.users(state=state)]


# ----- users(): pagination ---------------------------------------------------------------------------------


async def test_users_follows_pages_on_its_own_url(hub: HubDouble) -> None:
    hub.respond = users_api(USERS, page_size=1)
    assert await all_users(client(hub, page_size=1)) == ["alice", "bob", "carol"]
    # Every page from our server (next.url names elsewhere.invalid), with the media type, token and state.
    assert [r["query"]["offset"] for r in hub.requests] == [["0"], ["1"], ["2"]]
    for request in hub.requests:
        assert request["path"] == "/hub/api/users"
        assert request["query"]["state"] == ["active"]
        assert request["headers"]["Accept"] == PAGINATION_MEDIA_TYPE
        assert request["headers"]["Authorization"] == f"token {TOKEN}"


async def test_users_takes_the_hubs_page_size(hub: HubDouble) -> None:
    hub.respond = users_api(USERS, page_size=2)  # the hub caps our limit of 200 at 2
    assert await all_users(client(hub)) == ["alice", "bob", "carol"]
    assert [(r["query"]["offset"], r["query"]["limit"]) for r in hub.requests] == [(["0"], ["200"]), (["2"], ["2"])]


async def test_users_without_state_filter(hub: HubDouble) -> None:
    hub.respond = users_api(USERS, page_size=5)
    assert await all_users(client(hub), state=None) == ["alice", "bob", "carol"]
    assert "state" not in hub.requests[0]["query"]


async def test_users_from_a_hub_that_ignores_the_media_type(hub: HubDouble) -> None:
    hub.respond = lambda method, path, query, body: (200, USERS)
    assert await all_users(client(hub)) == ["alice", "bob", "carol"]
    assert len(hub.requests) == 1


async def test_a_page_that_does_not_move_on_is_an_error(hub: HubDouble) -> None:
    stuck = {"items": USERS[:1], "_pagination": {"next": {"offset": 0, "limit": 1}}}
    hub.respond = lambda method, path, query, body: (200, stuck)
    with pytest.raises(HubAPIError, match="does not move on"):
        await all_users(client(hub))


async def test_an_answer_that_is_no_user_list_is_an_error(hub: HubDouble) -> None:
    hub.respond = lambda method, path, query, body: (200, {"version": "6.1.1"})
    with pytest.raises(HubAPIError, match="not a JupyterHub user list"):
        await all_users(client(hub))


# ----- request() -------------------------------------------------------------------------------------------


async def test_request_sends_json_and_decodes_the_answer(hub: HubDouble) -> None:
    hub.respond = lambda method, path, query, body: (201, {"method": method, "path": path, "got": body})
    async with client(hub) as api:
        answer = await api.request("POST", "/users/alice/activity", {"last_activity": "2025-01-01T00:00:00Z"})
    assert answer == {
        "method": "POST",
        "path": "/hub/api/users/alice/activity",
        "got": {"last_activity": "2025-01-01T00:00:00Z"},
    }
    assert hub.requests[0]["headers"]["Content-Type"] == "application/json"


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH"])
async def test_request_without_body_and_empty_answer(hub: HubDouble, method: str) -> None:
    hub.respond = lambda method, path, query, body: (204, None)
    async with client(hub) as api:
        assert await api.request(method, "users/alice/server") is None
    assert hub.requests[0]["method"] == method
    assert hub.requests[0]["path"] == "/hub/api/users/alice/server"


async def test_delete_with_a_body(hub: HubDouble) -> None:
    hub.respond = lambda method, path, query, body: (202, {"got": body})
    async with client(hub) as api:
        assert await api.request("DELETE", "/users/alice/servers/gpu", {"remove": True}) == {"got": {"remove": True}}


# ----- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "answer", "message"),
    [
        pytest.param(403, {"status": 403, "message": "Action is not authorized"}, "lacks a scope", id="403"),
        pytest.param(401, {}, "token is unknown", id="401"),
        pytest.param(404, {"status": 404, "message": "No such user"}, "HTTP 404 to GET .*: No such user", id="404"),
        pytest.param(500, b"<html>oops</html>", r"HTTP 500 to GET \S*/users/alice\.$", id="500-html"),
        pytest.param(302, b"", "redirected", id="redirect"),
        pytest.param(200, b"<html>not json</html>", "not JSON", id="not-json"),
    ],
)
async def test_errors_are_sentences_with_the_status(hub: HubDouble, status: int, answer: Any, message: str) -> None:
    hub.respond = lambda method, path, query, body: (status, answer)
    async with client(hub) as api:
        with pytest.raises(HubAPIError, match=message) as caught:
            await api.request("GET", "/users/alice")
    assert caught.value.status == status
    assert TOKEN not in str(caught.value)


async def test_no_hub_listening() -> None:
    async with HubClient(f"{unused_url()}/hub/api", TOKEN) as api:
        with pytest.raises(HubAPIError, match="did not answer GET") as caught:
            await api.request("GET", "/users")
    assert caught.value.status == 0


async def test_a_hub_that_does_not_answer_in_time(hub: HubDouble) -> None:
    hub.delay_seconds = 2
    hub.respond = lambda method, path, query, body: (200, {})
    started = time.monotonic()
    async with client(hub, request_timeout_seconds=0.3) as api:
        with pytest.raises(HubAPIError, match=r"did not answer GET .*[Tt]imeout") as caught:
            await api.request("GET", "/users")
    assert caught.value.status == 0
    assert time.monotonic() - started < 1.5


# ----- the concurrency cap, the environment -----------------------------------------------------------------


async def test_concurrency_cap(hub: HubDouble) -> None:
    hub.delay_seconds = 0.2
    hub.respond = lambda method, path, query, body: (200, {"path": path})
    async with client(hub, concurrency=3) as api:
        answers = await asyncio.gather(*(api.request("GET", f"/users/u{i}") for i in range(9)))
    assert [a["path"] for a in answers] == [f"/hub/api/users/u{i}" for i in range(9)]
    assert hub.max_in_flight == 3


def test_url_and_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api/")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", TOKEN)
    api = HubClient()
    assert api.api_url == "http://127.0.0.1:8081/hub/api"
    assert HubClient("http://other/hub/api", "t2").api_url == "http://other/hub/api"


@pytest.mark.parametrize("missing", ["JUPYTERHUB_API_URL", "JUPYTERHUB_API_TOKEN"])
def test_missing_url_or_token(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", TOKEN)
    monkeypatch.delenv(missing)
    with pytest.raises(ValueError, match=missing):
        HubClient()
