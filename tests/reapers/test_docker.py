"""Tests for :mod:`dolab_services.reapers` (Docker): the orphan policy as tables, its registration in the shipped
config, and sweeps against the real Docker engines of the test stack with a hub double on 127.0.0.1.

The Docker tests create their own containers (DO-LAB's labels plus ``dolab.test=1`` and a label of their own
that the sweep is narrowed to, so that no other test's container is ever touched) and remove them afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import docker.errors
import pytest
from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

from dolab_services.hubclient import HubClient
from dolab_services.reapers.docker import (
    Orphan,
    container_record,
    find_orphans,
    parse_docker_hosts,
    sweep,
    unclaimed,
)
from dolab_services.reapers.registration import REAPER_SCOPES, reaper_service
from dolab_services.reapers.servers import servers_of, state_problem
from tests.cli_support import isolate_env
from tests.e2e.stack import docker_stack
from tests.hub_double import HubDouble, serve_hub_double, users_api

REPO = Path(__file__).resolve().parents[2]
NOW = 1_750_000_000.0
ID_A, ID_B = "a" * 64, "b" * 64
HUB = "hub0test"  # this hub's id in the policy tables


# ----- find_orphans ----------------------------------------------------------------------------------------


def container(
    name: str = "dolab-alice",
    user: str = "alice",
    server: str = "",
    engine: str = "local",
    cid: str = ID_A,
    age: float = 3600,
    managed: str = "true",
    hub: str | None = HUB,
) -> dict[str, Any]:
    """A container as container_record makes it (``hub`` None: from before hub ids, no ``dolab.hub`` label)."""
    labels = {"dolab.managed": managed, "dolab.user": user, "dolab.server": server, "dolab.host": engine}
    if hub is not None:
        labels["dolab.hub"] = hub
    return {"engine": engine, "id": cid, "name": name, "labels": labels, "created": NOW - age}


def docker_state(cid: str = ID_A, name: str = "dolab-alice", host: str = "local") -> dict[str, Any]:
    """DoLabSpawner's state for a docker server."""
    backend_state = {"object_id": cid, "object_name": name, "docker_host": host} if cid or name else {}
    return {"profile": "cpu", "backend": "docker", "host": host, "slots": [], "backend_state": backend_state}


def server(user: str = "alice", name: str = "", state: dict | None = None, pending: str | None = None) -> dict:
    """A server model with its user, as servers_of makes it."""
    return {
        "user": user,
        "name": name,
        "pending": pending,
        "ready": not pending,
        "state": docker_state() if state is None else state,
    }


ORPHAN_CASES = [
    pytest.param([container()], [server()], [], id="owned-by-id"),
    pytest.param([container()], [server(state=docker_state(cid=ID_B))], [], id="owned-by-name-on-its-engine"),
    pytest.param([container()], [server(state=docker_state(cid=ID_A[:12], name=""))], [], id="owned-by-short-id"),
    pytest.param(
        [container(user="bob", name="dolab-bob")],
        [server(state=docker_state(cid=ID_A, name="dolab-alice-old"))],
        [],
        id="owned-by-id-under-another-user",
    ),
    pytest.param([container()], [], [("dolab-alice", "the hub lists no server alice")], id="no-server"),
    pytest.param(
        [container(name="dolab-alice--gpu", server="gpu", cid=ID_B)],
        [server()],
        [("dolab-alice--gpu", "the hub lists no server alice/gpu")],
        id="user-listed-without-this-server",
    ),
    pytest.param(
        [container()],
        [server(state=docker_state(cid=ID_B, name="dolab-alice-2"))],
        [("dolab-alice", "server alice runs container dolab-alice-2")],
        id="server-runs-another-container",
    ),
    pytest.param(
        [container(engine="gpu2", cid=ID_B)],
        [server()],
        [("dolab-alice", "server alice runs on engine local")],
        id="same-name-on-another-engine",
    ),
    pytest.param([container(engine="gpu2")], [server(state=docker_state(host="gpu2"))], [], id="owned-on-engine-2"),
    pytest.param(
        [container(engine="gpu2", cid=ID_B)],
        [server(state={"backend": "docker", "host": "gpu2", "backend_state": {"object_name": "dolab-alice"}})],
        [],
        id="engine-from-state-host",
    ),
    pytest.param(
        [container()],
        [server(state={"profile": "cpu", "backend": "local", "backend_state": {"pid": 42}})],
        [("dolab-alice", "server alice now runs on the local backend")],
        id="server-moved-to-local",
    ),
    pytest.param([container()], [server(state={}, pending="spawn")], [], id="pending-spawn-empty-state"),
    pytest.param(
        [container()], [server(state=docker_state(cid=ID_B, name="x"), pending="stop")], [], id="pending-stop"
    ),
    pytest.param([container()], [server(state=docker_state(cid="", name=""))], [], id="state-names-no-container"),
    pytest.param([container()], [server(state={})], [], id="empty-state-not-pending"),
    pytest.param([container(age=10)], [], [], id="younger-than-grace"),
    pytest.param([container(age=300)], [], [("dolab-alice", "lists no server")], id="exactly-grace-old"),
    pytest.param([container(managed="false")], [], [], id="not-dolab-managed"),
    pytest.param([container(hub="otherhub")], [], [], id="another-hubs-container"),
    pytest.param([container(hub=None)], [], [], id="from-before-hub-ids"),
    pytest.param([container(hub="")], [], [], id="empty-hub-label"),
    pytest.param([container(hub=HUB.upper())], [], [], id="hub-id-compared-exactly"),
    pytest.param([container(hub=None)], [server()], [], id="from-before-hub-ids-owned"),
    pytest.param(
        [container(), container(name="dolab-bob", user="bob", cid=ID_B)],
        [server()],
        [("dolab-bob", "the hub lists no server bob")],
        id="one-owned-one-orphan",
    ),
]


@pytest.mark.parametrize(("containers", "servers", "expected"), ORPHAN_CASES)
def test_find_orphans(containers: list[dict], servers: list[dict], expected: list[tuple[str, str]]) -> None:
    orphans = find_orphans(containers, servers, NOW, grace_seconds=300, hub_id=HUB)
    assert [o.name for o in orphans] == [name for name, _ in expected]
    for orphan, (_, reason) in zip(orphans, expected, strict=True):
        assert reason in orphan.reason


def test_orphan_describes_itself() -> None:
    orphan = find_orphans([container(name="dolab-alice--gpu", server="gpu", age=7200)], [], NOW, 300, HUB)[0]
    assert orphan == Orphan("local", ID_A, "dolab-alice--gpu", "alice", "gpu", NOW - 7200, orphan.reason)
    line = orphan.describe(NOW)
    for part in ("dolab-alice--gpu", ID_A[:12], "engine local", "user alice", "server gpu", orphan.since, "2 h ago"):
        assert part in line


def test_find_orphans_needs_a_hub_id() -> None:
    with pytest.raises(ValueError, match="the hub id must be"):
        find_orphans([container()], [], NOW, 300, hub_id="")


def test_unclaimed_are_the_old_containers_no_server_runs() -> None:
    old = container(name="dolab-old", user="old", cid=ID_B, hub=None)
    kept = container(hub=None)
    found = unclaimed([old, kept, container(cid="c" * 64, hub="otherhub"), container(cid="d" * 64)], [server()])
    assert [c["name"] for c in found] == ["dolab-old"]


def test_container_record() -> None:
    raw = {"Id": ID_A, "Names": ["/dolab-alice"], "Labels": {"dolab.managed": "true"}, "Created": 1700000000}
    assert container_record("gpu2", raw) == {
        "engine": "gpu2",
        "id": ID_A,
        "name": "dolab-alice",
        "labels": {"dolab.managed": "true"},
        "created": 1700000000.0,
    }


def test_servers_of_and_state_problem() -> None:
    users = [{"name": "alice", "servers": {"": {"state": {}}, "gpu": {"state": {"backend": "docker"}}}}]
    assert [(s["user"], s["name"]) for s in servers_of(users)] == [("alice", ""), ("alice", "gpu")]
    assert state_problem(users) is None
    assert "read:servers" in (state_problem([{"name": "alice"}]) or "")
    assert "admin:server_state" in (state_problem([{"name": "alice", "servers": {"": {"ready": True}}}]) or "")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("not json", "not valid JSON", id="json"),
        pytest.param("[]", "non-empty list", id="empty"),
        pytest.param('[{"name": "a b"}]', "name must be", id="name"),
    ],
)
def test_parse_docker_hosts_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_docker_hosts(text)


# ----- registration in the hub's config --------------------------------------------------------------------

DOCKER_PROFILE = {"display_name": "Docker", "backend": "docker", "spawner_override": {"image": "lab:1"}}
ENV = {"DOLAB_HUB_ID": HUB}  # the hub's id, as the hub's environment may set it
LOCAL_PROFILE = {"display_name": "CPU", "backend": "local"}


def config_with(profiles: Any = None, hosts: Any = None, services: list | None = None) -> Config:
    c = Config()
    if profiles is not None:
        c.DoLabSpawner.profile_list = profiles
    if hosts is not None:
        c.DoLabSpawner.docker_hosts = hosts
    if services is not None:
        c.JupyterHub.services = services
    return c


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(Config(), id="no-profile-list"),
        pytest.param(config_with([LOCAL_PROFILE]), id="local-only"),
        pytest.param(config_with(lambda spawner: [DOCKER_PROFILE]), id="callable"),
        pytest.param(config_with([DOCKER_PROFILE], services=[{"name": "dolab-reaper"}]), id="admin-has-own"),
    ],
)
def test_no_reaper_service(config: Config) -> None:
    assert reaper_service(config, ENV, "/py") is None


@pytest.mark.parametrize(
    ("env", "hosts", "command_tail", "environment"),
    [
        pytest.param({}, None, ["--interval", "600"], {"DOLAB_DOCKER_HOSTS": '[{"name": "local"}]'}, id="default"),
        pytest.param(
            {"DOLAB_REAPER_INTERVAL": "120", "DOLAB_REAPER_REMOVE": "1"},
            None,
            ["--interval", "120", "--remove"],
            {"DOLAB_DOCKER_HOSTS": '[{"name": "local"}]'},
            id="interval-and-remove",
        ),
        pytest.param(
            {"DOLAB_REAPER_REMOVE": "yes"},
            None,
            ["--interval", "600"],
            {"DOLAB_DOCKER_HOSTS": '[{"name": "local"}]'},
            id="remove-only-with-1",
        ),
        pytest.param(
            {"DOCKER_HOST": "tcp://10.0.0.9:2375"},
            [{"name": "local"}, {"name": "gpu2", "url": "tcp://10.0.0.2:2376"}],
            ["--interval", "600"],
            {
                "DOLAB_DOCKER_HOSTS": '[{"name": "local"}, {"name": "gpu2", "url": "tcp://10.0.0.2:2376"}]',
                "DOCKER_HOST": "tcp://10.0.0.9:2375",
            },
            id="hosts-and-docker-host",
        ),
    ],
)
def test_reaper_service(env: dict, hosts: Any, command_tail: list[str], environment: dict) -> None:
    found = reaper_service(config_with([LOCAL_PROFILE, DOCKER_PROFILE], hosts), {**ENV, **env}, "/py")
    assert found is not None
    service, role = found.service, found.role
    assert service == {
        "name": "dolab-reaper",
        "command": ["/py", "-m", "dolab_services.reapers", "docker", *command_tail],
        "environment": {**environment, "DOLAB_HUB_ID": HUB},
    }
    assert role["name"] == "dolab-reaper"
    assert role["services"] == ["dolab-reaper"]
    assert role["scopes"] == ["list:users", "read:users:name", "read:servers", "admin:server_state"]


def test_reaper_service_sees_appended_profiles() -> None:
    c = Config()
    c.DoLabSpawner.profile_list.append(DOCKER_PROFILE)
    assert reaper_service(c, ENV, "/py") is not None


def test_reaper_service_takes_the_id_the_hub_keeps(tmp_path: Path) -> None:
    env = {"DOLAB_DATA_DIR": str(tmp_path / "data")}
    found = reaper_service(config_with([DOCKER_PROFILE]), env, "/py")
    kept = (tmp_path / "data" / "hub-id").read_text().strip()
    assert found is not None and found.service["environment"]["DOLAB_HUB_ID"] == kept
    again = reaper_service(config_with([DOCKER_PROFILE]), env, "/py")
    assert again is not None and again.service["environment"]["DOLAB_HUB_ID"] == kept, "the same id at every start"
    with pytest.raises(ValueError, match="DOLAB_HUB_ID must be 4 to 16 lowercase letters and digits"):
        reaper_service(config_with([DOCKER_PROFILE]), {"DOLAB_HUB_ID": "Bad Id"}, "/py")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "hub-id").write_text("../../etc\n")  # a hand-edited file is refused, never put into names
    with pytest.raises(ValueError, match="hub-id must be 4 to 16 lowercase letters and digits"):
        reaper_service(config_with([DOCKER_PROFILE]), {"DOLAB_DATA_DIR": str(broken)}, "/py")


@pytest.mark.parametrize(
    ("config", "env", "message"),
    [
        pytest.param(config_with([DOCKER_PROFILE], [{"name": "x", "url": "ftp://a"}]), {}, "url must", id="hosts"),
        pytest.param(config_with([DOCKER_PROFILE]), {"DOLAB_REAPER_INTERVAL": "soon"}, "a number", id="interval"),
        pytest.param(config_with([DOCKER_PROFILE]), {"DOLAB_REAPER_INTERVAL": "0"}, "positive", id="zero"),
    ],
)
def test_reaper_service_errors(config: Config, env: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reaper_service(config, {**ENV, **env}, "/py")


def load_shipped_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, profiles: list, overlay: str) -> Config:
    isolate_env(monkeypatch, tmp_path)
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    (overlays / "10-hosts.py").write_text(overlay)
    monkeypatch.setenv("DOLAB_CONFIG_DIR", str(overlays))
    monkeypatch.setenv("DOLAB_PROFILES", json.dumps(profiles))
    return PyFileConfigLoader("jupyterhub_config.py", path=str(REPO)).load_config()


def test_shipped_config_registers_the_reaper_after_the_overlays(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    overlay = "c.DoLabSpawner.docker_hosts = [{'name': 'local'}, {'name': 'gpu2', 'url': 'tcp://10.0.0.2:2376'}]\n"
    c = load_shipped_config(monkeypatch, tmp_path, [LOCAL_PROFILE, DOCKER_PROFILE], overlay)
    services = {s["name"]: s for s in c.JupyterHub.services}
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert {"dolab-cli", "dolab-reaper", "dolab-culler"} <= set(services)
    reaper = services["dolab-reaper"]
    assert reaper["command"] == [sys.executable, "-m", "dolab_services.reapers", "docker", "--interval", "600"]
    hub_id = (tmp_path / "data" / "hub-id").read_text().strip()
    assert reaper["environment"]["DOLAB_HUB_ID"] == hub_id
    assert json.loads(reaper["environment"]["DOLAB_DOCKER_HOSTS"]) == [
        {"name": "local"},
        {"name": "gpu2", "url": "tcp://10.0.0.2:2376"},
    ]
    assert roles["dolab-reaper"]["scopes"] == list(REAPER_SCOPES)
    assert roles["dolab-reaper"]["services"] == ["dolab-reaper"]
    assert "dolab-cli" in roles


def test_shipped_config_without_docker_profiles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    c = load_shipped_config(monkeypatch, tmp_path, [LOCAL_PROFILE], "")
    assert "dolab-reaper" not in [s["name"] for s in c.JupyterHub.services]
    assert "dolab-reaper" not in [r["name"] for r in c.JupyterHub.load_roles]


# ----- one container failing to go: a Docker engine double on a unix socket ---------------------------------


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a kept-alive connection the (cached) client drops at exit is no test failure


@pytest.fixture
def fake_engine(tmp_path: Path) -> Iterator[tuple[str, list[dict], dict[str, int]]]:
    """``(url, containers, delete_status)``: an engine answering the calls a sweep makes, from those two."""
    listed: list[dict] = []
    delete_status: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path.endswith("/version"):
                self.answer(200, {"ApiVersion": "1.41", "MinAPIVersion": "1.12", "Version": "double"})
            elif path.endswith("/containers/json"):
                self.answer(200, listed)
            else:
                self.answer(404, {"message": "not here"})

        def do_DELETE(self) -> None:
            cid = urlsplit(self.path).path.rsplit("/", 1)[-1]
            status = delete_status.get(cid, 204)
            self.answer(status, {"message": "driver failed to remove root filesystem"} if status >= 400 else {})

        def log_message(self, *args: Any) -> None:
            pass

    socket_path = tmp_path / "engine.sock"
    server = _UnixHTTPServer(str(socket_path), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"unix://{socket_path}", listed, delete_status
    finally:
        server.shutdown()
        server.server_close()


async def test_a_container_that_cannot_be_removed_does_not_stop_the_others(
    fake_engine: tuple[str, list[dict], dict[str, int]], hub: HubDouble, caplog: pytest.LogCaptureFixture
) -> None:
    url, listed, delete_status = fake_engine
    labels = {"dolab.managed": "true", "dolab.hub": HUB, "dolab.server": ""}
    for user, cid in (("stuck", ID_A), ("gone", ID_B), ("fine", "c" * 64)):
        raw = {"Id": cid, "Names": [f"/dolab-{user}"], "Labels": {**labels, "dolab.user": user}, "Created": 1}
        listed.append(raw)
    delete_status.update({ID_A: 500, ID_B: 404})
    hub.respond = users_api([])
    caplog.set_level(logging.INFO, logger="dolab.reaper")
    host = {"name": f"double-{uuid.uuid4().hex[:8]}", "url": url}
    async with HubClient(hub.api_url, "reaper-token") as api:
        result = await sweep(
            api, [host], hub_id=HUB, remove=True, grace_seconds=0, log=logging.getLogger("dolab.reaper")
        )
    assert [o.user for o in result.failed] == ["stuck"]
    assert [o.user for o in result.removed] == ["fine"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("Could not remove orphan container dolab-stuck") and "root filesystem" in m for m in messages
    )
    assert any(m.startswith("Orphan container dolab-gone") and m.endswith("already gone") for m in messages)


# ----- sweeps against the real engines ---------------------------------------------------------------------

ENGINE_SUFFIX = uuid.uuid4().hex[:8]
IMAGE = "dolab-singleuser-test:latest"


class Containers:
    """Creates DO-LAB-labelled containers for one test, all carrying its own ``dolab.test.run`` label."""

    def __init__(self, clients: dict[str, docker.DockerClient]) -> None:
        self.run = uuid.uuid4().hex[:10]
        self.clients = clients

    @property
    def label_filter(self) -> str:
        return f"dolab.test.run={self.run}"

    def make(self, user: str, server: str = "", engine: str = "e1") -> Any:
        name = f"dolab-{user}-{self.run}" + (f"--{server}" if server else "")
        labels = {
            "dolab.managed": "true",
            "dolab.hub": HUB,
            "dolab.user": user,
            "dolab.server": server,
            "dolab.host": engine,
            "dolab.gpus": "",
            "dolab.test": "1",
            "dolab.test.run": self.run,
        }
        made = self.clients[engine].containers.run(IMAGE, ["sleep", "600"], name=name, labels=labels, detach=True)
        made.reload()
        return made

    def exists(self, made: Any, engine: str = "e1") -> bool:
        try:
            self.clients[engine].containers.get(made.id)
            return True
        except docker.errors.NotFound:
            return False

    def remove_all(self) -> None:
        for client in self.clients.values():
            for made in client.containers.list(all=True, filters={"label": self.label_filter}):
                try:
                    made.remove(force=True)
                except docker.errors.NotFound:
                    pass


@pytest.fixture
def hosts() -> dict[str, dict[str, Any]]:
    """The ``docker_hosts`` the sweeps get: engine 2 over TCP with mutual TLS (a remote machine) when it listens so."""
    stack = docker_stack()
    second: dict[str, Any] = {"name": f"e2-{ENGINE_SUFFIX}", "url": stack.docker_host_2}
    if stack.docker_host_2_tls:
        second.update(url=stack.docker_host_2_tls, tls=dict(stack.tls_2))
    return {"e1": {"name": f"e1-{ENGINE_SUFFIX}", "url": stack.docker_host}, "e2": second}


@pytest.fixture
def containers() -> Iterator[Containers]:
    """The tests' own containers, made through each engine's local socket."""
    stack = docker_stack()
    urls = {"e1": stack.docker_host, "e2": stack.docker_host_2}
    clients = {key: docker.DockerClient(base_url=url, version="auto", timeout=30) for key, url in urls.items()}
    made = Containers(clients)
    try:
        yield made
    finally:
        made.remove_all()
        for client in clients.values():
            client.close()


@pytest.fixture
def hub() -> Iterator[HubDouble]:
    with serve_hub_double() as double:
        yield double


def running(made: Any, host: dict[str, str], user: str, server: str = "", pending: str | None = None) -> dict:
    """The user model the hub shows for a server running the container ``made``."""
    state = {
        "profile": "docker",
        "backend": "docker",
        "host": host["name"],
        "slots": [],
        "stop_at": "",
        "backend_state": {"object_id": made.id, "object_name": made.name, "docker_host": host["name"]},
    }
    model = {"name": server, "pending": pending, "ready": not pending, "state": state}
    return {"kind": "user", "name": user, "servers": {server: model}}


def pending_user(user: str, server: str = "") -> dict:
    """A user whose server is starting: the hub lists it as pending, with no state yet."""
    return {"kind": "user", "name": user, "servers": {server: {"name": server, "pending": "spawn", "state": {}}}}


Sweeper = Callable[..., Any]


@pytest.fixture
def run_sweep(hub: HubDouble, containers: Containers) -> Sweeper:
    async def run(hosts: list[dict], **kwargs: Any) -> Any:
        async with HubClient(hub.api_url, "reaper-token", page_size=1) as api:
            return await sweep(
                api,
                hosts,
                hub_id=HUB,
                label_filters=[containers.label_filter],
                log=logging.getLogger("dolab.reaper"),
                **{"grace_seconds": 0, "docker_timeout_seconds": 20, **kwargs},
            )

    return run


@pytest.mark.docker
async def test_sweep_reports_then_removes_the_orphan_only(
    hosts: dict, containers: Containers, hub: HubDouble, run_sweep: Sweeper, caplog: pytest.LogCaptureFixture
) -> None:
    owned = containers.make("alice")
    orphan = containers.make("bob", "gpu")
    starting = containers.make("carol")
    hub.respond = users_api([running(owned, hosts["e1"], "alice"), pending_user("carol")])
    caplog.set_level(logging.INFO, logger="dolab.reaper")

    result = await run_sweep([hosts["e1"]])
    assert [o.id for o in result.orphans] == [orphan.id]
    assert result.removed == [] and result.containers == 3
    assert all(containers.exists(c) for c in (owned, orphan, starting))
    line = next(r.getMessage() for r in caplog.records if orphan.name in r.getMessage())
    for part in (orphan.id[:12], f"engine {hosts['e1']['name']}", "user bob", "server gpu", "since", "Dry run"):
        assert part in line
    # Pages came from our own URL, one user each; the orphan's user was asked again before acting.
    assert [r["query"].get("offset") for r in hub.requests if r["path"] == "/hub/api/users"] == [["0"], ["1"]]
    assert any(r["path"] == "/hub/api/users/bob" for r in hub.requests)

    result = await run_sweep([hosts["e1"]], remove=True)
    assert [o.id for o in result.removed] == [orphan.id]
    assert not containers.exists(orphan)
    assert containers.exists(owned) and containers.exists(starting)
    assert any(r.getMessage().startswith(f"Removed orphan container {orphan.name}") for r in caplog.records)


@pytest.mark.docker
async def test_sweep_keeps_young_containers(
    containers: Containers, hosts: dict, hub: HubDouble, run_sweep: Sweeper
) -> None:
    young = containers.make("dave")
    hub.respond = users_api([])
    result = await run_sweep([hosts["e1"]], remove=True, grace_seconds=300)
    assert result.orphans == [] and result.containers == 1
    assert containers.exists(young)


@pytest.mark.docker
async def test_an_engine_that_is_down_does_not_abort_the_sweep(
    containers: Containers,
    hosts: dict,
    hub: HubDouble,
    run_sweep: Sweeper,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    orphan = containers.make("erin")
    hub.respond = users_api([])
    down = {"name": f"down-{ENGINE_SUFFIX}", "url": f"unix://{tmp_path}/no-docker.sock"}
    result = await run_sweep([down, hosts["e1"]], remove=True)
    assert result.engines_down == [down["name"]]
    assert [o.id for o in result.removed] == [orphan.id]
    assert any(f"Docker engine {down['name']} is not answering" in r.getMessage() for r in caplog.records)


@pytest.mark.docker
async def test_same_name_on_the_other_engine_is_an_orphan(
    containers: Containers, hosts: dict, hub: HubDouble, run_sweep: Sweeper
) -> None:
    owned = containers.make("frank", engine="e1")
    twin = containers.make("frank", engine="e2")  # same name, the other engine
    assert owned.name == twin.name
    hub.respond = users_api([running(owned, hosts["e1"], "frank")])
    result = await run_sweep([hosts["e1"], hosts["e2"]], remove=True)
    assert [(o.engine, o.id) for o in result.removed] == [(hosts["e2"]["name"], twin.id)]
    assert containers.exists(owned, "e1") and not containers.exists(twin, "e2")


@pytest.mark.docker
@pytest.mark.parametrize(
    "respond",
    [
        pytest.param(lambda method, path, query, body: (500, {"message": "database is locked"}), id="hub-error"),
        pytest.param(
            users_api([{"kind": "user", "name": "gina", "servers": {"": {"ready": True}}}]), id="no-server-state"
        ),
        pytest.param(lambda method, path, query, body: (403, {}), id="missing-scopes"),
    ],
)
async def test_nothing_is_removed_when_the_hub_cannot_be_read(
    containers: Containers, hosts: dict, hub: HubDouble, run_sweep: Sweeper, respond: Any
) -> None:
    orphan = containers.make("gina")
    hub.respond = respond
    result = await run_sweep([hosts["e1"]], remove=True)
    assert result.hub_error and result.orphans == []
    assert containers.exists(orphan)


@pytest.mark.docker
async def test_an_owner_missing_from_the_list_is_asked_again(
    containers: Containers, hosts: dict, hub: HubDouble, run_sweep: Sweeper
) -> None:
    # The paged list missed harry (a user moved pages between two requests); his own model shows his server.
    owned = containers.make("harry")
    listed = users_api([])
    direct = users_api([running(owned, hosts["e1"], "harry")])
    hub.respond = lambda method, path, query, body: (listed if path == "/hub/api/users" else direct)(
        method, path, query, body
    )
    result = await run_sweep([hosts["e1"]], remove=True)
    assert result.orphans == []
    assert containers.exists(owned)


@pytest.mark.docker
def test_the_service_runs_once_as_a_dry_run(containers: Containers, hosts: dict, hub: HubDouble) -> None:
    # Engine 2 (TLS, where the stack has it) comes through DOLAB_DOCKER_HOSTS as JSON, as the hub passes it.
    orphan = containers.make("ivan", engine="e2")
    hub.respond = users_api([], page_size=200)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "DOLAB_"))},
        "JUPYTERHUB_API_URL": hub.api_url,
        "JUPYTERHUB_API_TOKEN": "reaper-token",
        "DOLAB_DOCKER_HOSTS": json.dumps([hosts["e1"], hosts["e2"]]),
        "DOLAB_HUB_ID": HUB,
    }
    command = [sys.executable, "-m", "dolab_services.reapers", "docker", "--once", "--grace-seconds", "0"]
    command += ["--interval", "5"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"Orphan container {orphan.name} (id {orphan.id[:12]})" in done.stderr
    assert f"on engine {hosts['e2']['name']}" in done.stderr and "Dry run" in done.stderr
    assert containers.exists(orphan, "e2")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--docker-hosts", "[{"], "not valid JSON", id="bad-hosts"),
        pytest.param(["--interval", "0"], "positive number", id="zero-interval"),
        pytest.param(["--docker-hosts", '[{"name": "local"}]'], "JUPYTERHUB_API_URL", id="no-hub"),
        pytest.param(["--hub-id", "x"], "--hub-id must be 4 to 16 lowercase letters", id="bad-hub-id"),
        pytest.param([], "This hub has no id yet", id="no-hub-id"),
    ],
)
def test_the_service_refuses_bad_settings(args: list[str], message: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "DOLAB_"))}
    env.update(JUPYTERHUB_API_URL="http://127.0.0.1:1/hub/api", JUPYTERHUB_API_TOKEN="t")
    env["DOLAB_DATA_DIR"] = str(tmp_path / "no-data")  # no hub ran here: no hub-id file
    if "JUPYTERHUB_API_URL" in message:
        del env["JUPYTERHUB_API_URL"]
    command = [sys.executable, "-m", "dolab_services.reapers", "docker", "--once", *args]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("dolab-reaper: ") and message in done.stderr
    assert "Traceback" not in done.stderr
