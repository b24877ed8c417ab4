"""Tests for :mod:`dolab_services.culler.web`: the culler's page and API, on the Lab's doubles."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest_asyncio
import requests
from bs4 import BeautifulSoup
from prometheus_client.parser import text_string_to_metric_families

from dolab_core.times import format_time
from dolab_services.culler.registration import USER_SCOPE
from dolab_services.hubclient import HubClient
from dolab_services.scopes import STOP_SERVERS as STOP

from .support import Lab, ago, sweeper


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
