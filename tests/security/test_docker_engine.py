"""Attacks on the docker backend (issue 12, items 4 and 12), on the test stack's real Docker engines and a real hub.

Item 4: a ``tls`` entry shaped like the README's example must verify the engine. An impostor on the network (here: a
TLS server on loopback with a certificate from another CA) must never receive a request: a create call carries the
server's token. The real engine 2 (TCP + mutual TLS) answers with the right CA only, and a ``tls`` entry that cannot
verify stops the hub at start-up with a sentence.

Item 12: a profile whose container would run as root, however the user is spelled (``0000``, ``root:root``, ``0:100``,
a name that the image's /etc/passwd maps to uid 0), is refused with a sentence and leaves nothing behind; the admin's
``security_opt`` is kept beside ``no-new-privileges`` on the container the engine really created.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import ssl
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dolab_core.engines.docker import DockerEngines, check_docker_hosts
from tests.e2e.hub import Hub, free_port
from tests.e2e.stack import DockerStack, docker_stack

pytestmark = [pytest.mark.e2e, pytest.mark.docker]


# ----- certificates from a CA of the attacker's -------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(directory: Path, common_name: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A CA of its own: ``directory/ca.pem``, its key and certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(directory: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 (the name a client checks), signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server-cert.pem", directory / "server-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class ImpostorEngine:
    """A Docker Engine API on 127.0.0.1 over TLS with a certificate from the attacker's CA; records every request
    that reached it (what a hub that trusted it would have sent: the create call holds the server's token)."""

    def __init__(self, directory: Path) -> None:
        _, ca_key, ca = make_ca(directory, "Impostor CA")
        cert, key = make_server_cert(directory, ca_key, ca)
        self.requests: list[str] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                seen.append(f"{self.command} {self.path}")
                body = json.dumps({"ApiVersion": "1.41", "MinAPIVersion": "1.12", "Version": "impostor"}).encode()
                if "/containers/json" in self.path:
                    body = b"[]"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a refused handshake is what the test wants

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"tcp://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def stack() -> DockerStack:
    return docker_stack()


@pytest.fixture(scope="module")
def tls_2(stack: DockerStack) -> dict[str, Any]:
    """Engine 2's TLS settings (its CA, the hub's client certificate); no skip on CI."""
    if not stack.docker_host_2_tls:
        problem = "The Docker test stack has no TLS listener on engine 2 (an older stack.json): rerun `make stack-up`."
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    return dict(stack.tls_2)


@pytest.fixture
def impostor(tmp_path: Path) -> Iterator[ImpostorEngine]:
    engine = ImpostorEngine(tmp_path / "impostor")
    try:
        yield engine
    finally:
        engine.close()


def readme_tls(tls_2: dict[str, Any]) -> dict[str, Any]:
    """The ``tls`` entry as the README shows it: the CA and the client certificate, nothing else."""
    return {"ca_cert": tls_2["ca_cert"], "client_cert": list(tls_2["client_cert"])}


@pytest.mark.parametrize("configured", ["docker_hosts", "environment"])
def test_an_impostor_engine_gets_no_request(
    impostor: ImpostorEngine,
    tls_2: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    configured: str,
) -> None:
    # The attacker answers at the engine's address (DNS, ARP, a moved IP) with a certificate from a CA of its own.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    if configured == "docker_hosts":
        host = {"name": "gpu2", "url": impostor.url, "tls": readme_tls(tls_2)}
        check_docker_hosts([host])
    else:
        # The engine without url: DOCKER_HOST and DOCKER_CERT_PATH, without DOCKER_TLS_VERIFY (docker-py: no check).
        certs = tmp_path / "certs"
        certs.mkdir()
        shutil.copyfile(tls_2["ca_cert"], certs / "ca.pem")
        shutil.copyfile(tls_2["client_cert"][0], certs / "cert.pem")
        shutil.copyfile(tls_2["client_cert"][1], certs / "key.pem")
        monkeypatch.setenv("DOCKER_HOST", impostor.url)
        monkeypatch.setenv("DOCKER_CERT_PATH", str(certs))
        monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
        host = {"name": "local"}
    engines = DockerEngines()
    with pytest.raises((docker.errors.DockerException, requests.exceptions.SSLError)):
        client = engines.client(host, 10)
        client.containers(all=True)
    assert impostor.requests == [], f"the hub talked to an engine it cannot trust: {impostor.requests}"


def test_the_real_tls_engine_answers_with_its_ca_only(
    stack: DockerStack, tls_2: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    right = {"name": "tls2", "url": stack.docker_host_2_tls, "tls": readme_tls(tls_2)}
    client = DockerEngines().client(check_docker_hosts([right])[0], 20)
    try:
        assert client.version()["ApiVersion"]
    finally:
        client.close()
    other_ca, _, _ = make_ca(tmp_path / "other", "Some other CA")
    wrong = {**right, "tls": {**right["tls"], "ca_cert": str(other_ca)}}
    with pytest.raises(docker.errors.DockerException, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        DockerEngines().client(check_docker_hosts([wrong])[0], 10)


@pytest.mark.parametrize(
    ("tls", "phrase"),
    [
        pytest.param({"client_cert": ["/etc/dolab/cert.pem", "/etc/dolab/key.pem"]}, "tls needs ca_cert", id="no-ca"),
        pytest.param({"ca_cert": "/etc/dolab/ca.pem", "verify": False}, "tls always verifies", id="verify-off"),
    ],
)
def test_a_tls_engine_that_cannot_be_verified_stops_the_hub(tmp_path: Path, tls: dict[str, Any], phrase: str) -> None:
    hosts = [{"name": "local"}, {"name": "gpu2", "url": "tcp://127.0.0.1:9", "tls": tls}]
    overlay = f"""
c.DoLabSpawner.profile_list = [{{"display_name": "Docker", "slug": "d", "backend": "docker"}}]
c.DoLabSpawner.docker_hosts = {hosts!r}
"""
    hub = Hub(tmp_path, overlay=overlay)
    try:
        with pytest.raises(RuntimeError) as info:
            hub.start(timeout=90)
    finally:
        hub.shutdown()
    log = str(info.value)
    assert "DO-LAB: bad configuration: DoLabSpawner.docker_hosts: docker_hosts[1]:" in log
    assert phrase in log and "Traceback" not in log


# ----- item 12: root containers and the admin's security options -----------------------------------------------

RUN = uuid.uuid4().hex[:10]
ADMIN_OPT = "label=level:s0:c1,c2"  # an admin's SELinux level for these containers


@pytest.fixture(scope="module")
def toor_image(stack: DockerStack) -> Iterator[str]:
    """The test image with a second name for uid 0 (``toor``), and that name as its user."""
    client = docker.DockerClient(base_url=stack.docker_host, version="auto", timeout=60)
    tag = f"dolab-test-toor:{RUN}"
    line = "toor:x:0:0:another root:/root:/bin/sh"
    made = client.containers.create(
        stack.image, ["sh", "-c", f"echo '{line}' >> /etc/passwd"], user="0", labels={"dolab.test": "1"}
    )
    try:
        made.start()
        assert made.wait(timeout=60)["StatusCode"] == 0
        made.commit(repository="dolab-test-toor", tag=RUN, changes=["USER toor"])
    finally:
        made.remove(force=True)
    try:
        yield tag
    finally:
        client.images.remove(tag, force=True)
        client.close()


@pytest.fixture(scope="module")
def hub(stack: DockerStack, toor_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("security-docker-hub")
    profiles = [
        {"display_name": "Docker CPU", "slug": "cpu", "backend": "docker", "default": True},
        {"display_name": "Zeros", "slug": "zeros", "backend": "docker", "spawner_override": {"container_user": "0000"}},
        {
            "display_name": "Root pair",
            "slug": "rootpair",
            "backend": "docker",
            "spawner_override": {"container_user": "root:root"},
        },
        {
            "display_name": "Uid 0, a group",
            "slug": "zerogroup",
            "backend": "docker",
            "spawner_override": {"container_user": "0:100"},
        },
        {"display_name": "Toor image", "slug": "toor", "backend": "docker", "spawner_override": {"image": toor_image}},
    ]
    overlay = f"""
c.DoLabSpawner.profile_list = {profiles!r}
c.DoLabSpawner.gpu_inventory = []
c.DoLabSpawner.docker_hosts = [{{"name": "local", "url": {stack.docker_host!r}}}]
c.DockerSpawner.image = {stack.image!r}
c.DockerSpawner.extra_create_kwargs = {{"labels": {{"dolab.test": "1", "dolab.test.run": {RUN!r}}}}}
c.DockerSpawner.extra_host_config = {{"security_opt": [{ADMIN_OPT!r}]}}
c.DockerBackend.docker_timeout_seconds = 20
"""
    # The hub's API on the bridge address only: containers reach it there, nothing else does.
    env = {"DOLAB_HUB_IP": stack.bridge_ip, "DOLAB_HUB_PORT": str(free_port())}
    hub = Hub(root, overlay=overlay, env=env).start()
    try:
        yield hub
    finally:
        hub.shutdown()
        client = docker.DockerClient(base_url=stack.docker_host, timeout=60)
        for container in client.containers.list(all=True, filters={"label": f"dolab.test.run={RUN}"}):
            container.remove(force=True)
        client.close()


def containers_of(stack: DockerStack, user: str) -> list[Any]:
    client = docker.DockerClient(base_url=stack.docker_host, timeout=30)
    try:
        return client.containers.list(all=True, filters={"label": [f"dolab.user={user}", f"dolab.test.run={RUN}"]})
    finally:
        client.close()


@pytest.mark.parametrize(
    ("profile", "user"),
    [
        pytest.param("zeros", "'0000'", id="0000"),
        pytest.param("rootpair", "'root:root'", id="root:root"),
        pytest.param("zerogroup", "'0:100'", id="uid-0-with-a-group"),
        pytest.param("toor", "'toor'", id="a-name-for-uid-0-in-the-image"),
    ],
)
def test_a_root_container_is_refused_with_a_sentence(hub: Hub, stack: DockerStack, profile: str, user: str) -> None:
    name = f"root-{profile}"
    hub.create_user(name)
    reply = hub.start_server(name, {"profile": profile})
    message = reply.json().get("message", "") if reply.status_code >= 400 else ""
    if reply.status_code == 202:  # refused after the reply: read the spawn page's last event
        message = hub.progress_events(name, timeout=120)[-1].get("message", "")
    # Refused before anything runs; "root:root" and "0:100" were refused before too (a regression guard), "0000"
    # and "toor" started a root container.
    assert "would run its container as root" in message, (reply.status_code, reply.text, message)
    assert user in message and "Traceback" not in message
    assert hub.user(name)["servers"] == {}
    assert containers_of(stack, name) == [], "nothing may be left, not even the container that read /etc/passwd"


def test_the_admins_security_options_stay_beside_no_new_privileges(hub: Hub, stack: DockerStack) -> None:
    hub.create_user("opal")
    reply = hub.start_server("opal", {"profile": "cpu"})
    assert reply.status_code in (201, 202), reply.text
    hub.wait_ready("opal", timeout=120)
    state = hub.user("opal")["servers"][""]["state"]["backend_state"]
    client = docker.APIClient(base_url=stack.docker_host, version="auto", timeout=30)
    try:
        attrs = client.inspect_container(state["object_id"])
    finally:
        client.close()
    options = attrs["HostConfig"]["SecurityOpt"]
    assert ADMIN_OPT in options, f"the admin's option was dropped: {options}"
    assert "no-new-privileges" in options, f"no-new-privileges was dropped: {options}"
    assert attrs["HostConfig"]["CapDrop"] == ["ALL"]
    # The container carries the hub's identity, in its name and labels (issue 12, item 11).
    hub_id = (hub.data_dir / "hub-id").read_text().strip()
    assert attrs["Config"]["Labels"]["dolab.hub"] == hub_id
    assert attrs["Name"].lstrip("/") == f"dolab-{hub_id}-opal"
    hub.stop_server("opal")
