"""Unit tests for dolab_core.engines.docker: docker_hosts validation (ssh and tls settings included), the engines'
thread pools, and reaching ssh:// engines with an entry's own key and known hosts (on the test stack's engine 2)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import docker.errors
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from dolab_core.engines import docker as docker_engines
from dolab_core.engines.docker import DockerEngines, check_docker_hosts

GPU = {"index": 0, "uuid": "GPU-r-0", "name": "NVIDIA A100 80GB", "memory_gb": 80}


@pytest.mark.parametrize(
    "hosts",
    [
        pytest.param([{"name": "local"}], id="default"),
        pytest.param([{"name": "local", "url": "unix:///var/run/docker.sock"}], id="socket"),
        pytest.param(
            [
                {"name": "local"},
                {
                    "name": "gpu-2",
                    "url": "tcp://10.0.0.2:2376",
                    "tls": {"ca_cert": "/etc/dolab/ca.pem", "client_cert": ["/c.pem", "/k.pem"], "verify": True},
                    "gpu_inventory": [GPU],
                    "hub_connect_url": "http://10.0.0.1:8081",
                    "workspace": "volume",
                },
                {"name": "gpu-3", "url": "ssh://dolab@gpu3"},
            ],
            id="three-engines",
        ),
    ],
)
def test_good_docker_hosts(hosts: list[dict[str, Any]]) -> None:
    assert check_docker_hosts(hosts) == hosts


@pytest.mark.parametrize(
    ("hosts", "phrase"),
    [
        pytest.param([], "non-empty list", id="empty"),
        pytest.param({"name": "local"}, "non-empty list", id="not-a-list"),
        pytest.param(["local"], "must be a dict", id="entry-not-dict"),
        pytest.param([{"url": "unix:///x"}], "name must be", id="no-name"),
        pytest.param([{"name": "a b"}], "name must be", id="bad-name"),
        pytest.param([{"name": "x", "host": "y"}], "unknown key(s) host", id="unknown-key"),
        pytest.param([{"name": "x", "url": "https://x"}], "url must start with", id="bad-scheme"),
        pytest.param([{"name": "x", "workspace": "nfs"}], "workspace must be", id="bad-workspace"),
        pytest.param([{"name": "x", "tls": True}], "tls must be a dict", id="bad-tls"),
        pytest.param([{"name": "x", "gpu_inventory": [{"index": 0}]}], "missing uuid, name", id="bad-gpu"),
        pytest.param([{"name": "x"}, {"name": "x"}], "names must be unique", id="duplicate"),
    ],
)
def test_bad_docker_hosts(hosts: Any, phrase: str) -> None:
    with pytest.raises(ValueError) as info:
        check_docker_hosts(hosts)
    assert phrase in str(info.value)


@pytest.mark.docker
async def test_a_long_pull_does_not_stall_other_calls() -> None:
    from tests.e2e.stack import docker_stack

    host = {"name": "pool-test", "url": docker_stack().docker_host}
    engines = DockerEngines()
    release = threading.Event()
    pull_pool = engines.pool(host, 2, purpose="pull")
    stuck = [pull_pool.submit(release.wait, 30) for _ in range(2)]  # both pull threads busy
    try:
        client = engines.client(host, 10)
        api_pool = engines.pool(host, 8)
        versions = await asyncio.gather(*(asyncio.wrap_future(api_pool.submit(client.version)) for _ in range(8)))
        assert all(v["ApiVersion"] for v in versions)
        assert not any(f.done() for f in stuck), "the API calls finished while every pull thread was still busy"
    finally:
        release.set()


# ----- ssh:// engines with the entry's own key and known hosts ------------------------------------------------

SSH = {"identity_file": "/etc/dolab/id_ed25519", "known_hosts": "/etc/dolab/known_hosts"}


@pytest.mark.parametrize(
    ("entry", "phrase"),
    [
        pytest.param({"url": "ssh://dolab@gpu3", "ssh": SSH}, None, id="good"),
        pytest.param({"url": "ssh://dolab@gpu3:2222", "ssh": SSH, "use_ssh_client": False}, None, id="good-port"),
        pytest.param({"url": "ssh://dolab@gpu3", "ssh": "/etc/dolab/id_ed25519"}, "ssh must be a dict", id="str"),
        pytest.param({"url": "ssh://dolab@gpu3", "ssh": {}}, "exactly identity_file and known_hosts", id="empty"),
        pytest.param({"url": "ssh://dolab@gpu3", "ssh": {"identity_file": "/k"}}, "exactly", id="no-known-hosts"),
        pytest.param({"url": "ssh://dolab@gpu3", "ssh": {"known_hosts": "/kh"}}, "exactly", id="no-identity"),
        pytest.param({"url": "ssh://dolab@gpu3", "ssh": {**SSH, "password": "x"}}, "exactly", id="extra-key"),
        pytest.param(
            {"url": "ssh://dolab@gpu3", "ssh": {**SSH, "identity_file": "id_ed25519"}},
            "ssh identity_file must be an absolute path",
            id="relative",
        ),
        pytest.param(
            {"url": "ssh://dolab@gpu3", "ssh": {**SSH, "known_hosts": None}},
            "ssh known_hosts must be an absolute path",
            id="none",
        ),
        pytest.param({"url": "tcp://10.0.0.2:2376", "ssh": SSH}, "only for an ssh:// url", id="tcp-url"),
        pytest.param({"ssh": SSH}, "only for an ssh:// url", id="no-url"),
        pytest.param(
            {"url": "ssh://dolab@gpu3", "ssh": SSH, "use_ssh_client": True}, "cannot go with use_ssh_client", id="cli"
        ),
        pytest.param({"url": "ssh://dolab@gpu3", "ssh": SSH, "tls": {"verify": True}}, "cannot go with tls", id="tls"),
    ],
)
def test_docker_hosts_ssh_settings(entry: dict[str, Any], phrase: str | None) -> None:
    hosts = [{"name": "gpu-3", **entry}]
    if phrase is None:
        assert check_docker_hosts(hosts) == hosts
        return
    with pytest.raises(ValueError) as info:
        check_docker_hosts(hosts)
    assert phrase in str(info.value)


def ssh_engine2() -> tuple[Any, dict[str, Any]]:
    """The test stack and a docker_hosts entry for engine 2 over ssh, with the stack's key and known_hosts."""
    from tests.e2e.stack import docker_stack

    stack = docker_stack()
    if not stack.docker_host_2_ssh:
        problem = "The Docker test stack has no sshd in front of engine 2 (an older stack.json): rerun `make stack-up`."
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    return stack, {"name": "gpu-ssh", "url": stack.docker_host_2_ssh, "ssh": dict(stack.ssh_2)}


@pytest.fixture
def bare_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub user whose ~/.ssh knows no host and holds no key, and no ssh agent: only the entry's `ssh` can work."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


def engine_identity(client: docker.APIClient) -> tuple[str, str]:
    """Which engine answers: its ID and data root (Docker 20.10 takes the ID from /etc/docker/key.json, which the
    stack's two engines share; their data roots differ)."""
    info = client.info()
    return info["ID"], info["DockerRootDir"]


@pytest.mark.docker
async def test_an_ssh_engine_is_reached_with_its_own_key_and_known_hosts(bare_home: Path) -> None:
    stack, host = ssh_engine2()
    engines = DockerEngines()
    client = engines.client(host, 20)
    pool = engines.pool(host, 8)
    try:
        assert client.version()["ApiVersion"]
        over_ssh = engine_identity(client)
        # As the engine's pool calls it: parallel calls, each on its own channel of the one ssh connection.
        versions = await asyncio.gather(*(asyncio.wrap_future(pool.submit(client.version)) for _ in range(8)))
        assert all(v["ApiVersion"] for v in versions)
    finally:
        pool.shutdown()
        client.close()
    engine1 = docker.APIClient(base_url=stack.docker_host, version="auto", timeout=20)
    engine2 = docker.APIClient(base_url=stack.docker_host_2, version="auto", timeout=20)
    try:
        assert over_ssh == engine_identity(engine2), "ssh:// did not reach engine 2"
        assert over_ssh != engine_identity(engine1), "ssh:// reached engine 1, not engine 2"
    finally:
        engine1.close()
        engine2.close()


@pytest.mark.docker
def test_without_ssh_settings_the_hub_users_ssh_is_used(bare_home: Path) -> None:
    _, host = ssh_engine2()
    del host["ssh"]  # docker-py's own paramiko transport: the empty ~/.ssh/known_hosts does not know the host
    with pytest.raises(docker.errors.DockerException, match="not found in known_hosts"):
        DockerEngines().client(host, 10)


def other_ed25519_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.mark.docker
@pytest.mark.parametrize(
    ("known", "phrase"),
    [
        pytest.param("empty", "not found in known_hosts", id="empty-known-hosts"),
        pytest.param("other-port", "not found in known_hosts", id="the-key-for-another-port"),
        pytest.param("other-key", "does not match", id="another-key-for-the-host"),
    ],
)
def test_an_unknown_ssh_host_key_is_refused(bare_home: Path, tmp_path: Path, known: str, phrase: str) -> None:
    _, host = ssh_engine2()
    port = urlparse(host["url"]).port
    right = Path(host["ssh"]["known_hosts"]).read_text().split()[1:3]  # "ssh-ed25519 AAAA..."
    other = (
        other_ed25519_key()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        {
            "empty": "",
            "other-port": f"127.0.0.1 {' '.join(right)}\n[127.0.0.1]:{port + 1} {' '.join(right)}\n",
            "other-key": f"[127.0.0.1]:{port} {other.decode()}\n",
        }[known]
    )
    # The right key, so the host key is all that is wrong: paramiko checks it before it offers any key.
    entry = {**host, "ssh": {**host["ssh"], "known_hosts": str(known_hosts)}}
    with pytest.raises(docker.errors.DockerException) as info:
        DockerEngines().client(entry, 10)
    message = str(info.value)
    assert phrase in message
    assert f"known hosts {known_hosts}" in message
    assert "Docker host 'gpu-ssh'" in message


@pytest.mark.docker
def test_a_wrong_ssh_identity_is_refused(bare_home: Path, tmp_path: Path) -> None:
    _, host = ssh_engine2()
    wrong = tmp_path / "id_ed25519"
    wrong.write_bytes(
        other_ed25519_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    wrong.chmod(0o600)
    # The right key in the hub user's ~/.ssh is never tried: only identity_file is offered.
    shutil.copyfile(host["ssh"]["identity_file"], bare_home / ".ssh" / "id_ed25519")
    (bare_home / ".ssh" / "id_ed25519").chmod(0o600)
    entry = {**host, "ssh": {**host["ssh"], "identity_file": str(wrong)}}
    with pytest.raises(docker.errors.DockerException, match=r"AuthenticationException: Authentication failed"):
        DockerEngines().client(entry, 10)


# ----- tls: always verified against the entry's CA ----------------------------------------------------------------

TLS = {"ca_cert": "/etc/dolab/ca.pem", "client_cert": ["/etc/dolab/cert.pem", "/etc/dolab/key.pem"]}


@pytest.mark.parametrize(
    ("entry", "phrase"),
    [
        pytest.param({"url": "tcp://10.0.0.2:2376", "tls": TLS}, None, id="readme-shape"),
        pytest.param({"url": "tcp://10.0.0.2:2376", "tls": {**TLS, "verify": True}}, None, id="verify-true"),
        pytest.param({"url": "tcp://10.0.0.2:2376", "tls": {"ca_cert": "/ca.pem"}}, None, id="ca-only"),
        pytest.param(
            {"url": "tcp://10.0.0.2:2376", "tls": {"client_cert": TLS["client_cert"]}}, "needs ca_cert", id="no-ca"
        ),
        pytest.param({"url": "tcp://10.0.0.2:2376", "tls": {}}, "needs ca_cert", id="empty"),
        pytest.param(
            {"url": "tcp://10.0.0.2:2376", "tls": {**TLS, "ca_cert": "ca.pem"}}, "needs ca_cert", id="relative"
        ),
        pytest.param(
            {"url": "tcp://10.0.0.2:2376", "tls": {**TLS, "verify": False}}, "always verifies", id="verify-off"
        ),
        pytest.param(
            {"url": "tcp://10.0.0.2:2376", "tls": {**TLS, "verify": "/x.pem"}}, "always verifies", id="verify-path"
        ),
        pytest.param(
            {"url": "tcp://10.0.0.2:2376", "tls": {**TLS, "assert_hostname": False}}, "unknown tls", id="extra"
        ),
        pytest.param({"url": "http://10.0.0.2:2376", "tls": TLS}, "needs a tcp:// url", id="http-is-plain"),
        pytest.param({"url": "unix:///run/docker.sock", "tls": TLS}, "needs a tcp:// url", id="unix"),
        pytest.param({"tls": TLS}, "needs a tcp:// url", id="no-url"),
        pytest.param(
            {"url": "tcp://10.0.0.2:2376", "tls": {**TLS, "client_cert": ["/c.pem"]}}, "client_cert", id="one"
        ),
        pytest.param({"url": "tcp://10.0.0.2:2376", "tls": {**TLS, "client_cert": "/c.pem"}}, "client_cert", id="str"),
    ],
)
def test_docker_hosts_tls_settings(entry: dict[str, Any], phrase: str | None) -> None:
    hosts = [{"name": "gpu-2", **entry}]
    if phrase is None:
        assert check_docker_hosts(hosts) == hosts
        return
    with pytest.raises(ValueError) as info:
        check_docker_hosts(hosts)
    assert phrase in str(info.value)


def test_a_tls_config_always_verifies(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    tls = docker_engines._verified_tls(str(ca), None)
    assert (tls.verify, tls.ca_cert, tls.cert) == (True, str(ca), None)
    with pytest.raises(docker.errors.TLSParameterError):
        docker_engines._verified_tls(None, None)
    with pytest.raises(docker.errors.TLSParameterError):
        docker_engines._verified_tls(str(tmp_path / "missing.pem"), None)
