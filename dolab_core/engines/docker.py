"""Docker engines: one API client and bounded thread pools per engine, and the ``docker_hosts`` check.

Shared by the docker backend (which starts containers on these engines) and the reaper (which removes what a
crash left behind on them), so both reach an engine the same way: a ``tls`` engine is always verified against its
``ca_cert``, an ``ssh://`` engine with its own key and known hosts only. Importing this module imports docker-py
and paramiko; nothing in :mod:`dolab_core` imports it at start-up.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import docker
import docker.errors
import paramiko
from docker.transport.sshconn import SSHHTTPAdapter

from ..gpus import GpuSlot

__all__ = [
    "DOLAB_LABEL",
    "HUB_LABEL",
    "DockerEngines",
    "check_docker_hosts",
    "engines",
]

#: Every container DO-LAB creates carries this label (the reaper looks for it).
DOLAB_LABEL = "dolab.managed"
#: ... and this one, with the id of the hub that made it: a reaper removes only its own hub's containers.
HUB_LABEL = "dolab.hub"


class _TlsEngineClient(docker.APIClient):
    """An engine client that trusts only its configured CA.

    requests prefers REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE from the environment over the client's own CA
    (docker-py#2433), so a hub with a corporate CA bundle could never verify its TLS engines. requests.Session
    sets ``trust_env`` in its constructor, before docker-py's first call; this property keeps it off.
    """

    @property
    def trust_env(self) -> bool:
        return False

    @trust_env.setter
    def trust_env(self, value: bool) -> None:
        pass


class _SshEngineClient(docker.APIClient):
    """An engine client over ssh:// with the ``docker_hosts`` entry's own key and known hosts (its ``ssh``).

    docker-py's paramiko transport reads the hub user's ~/.ssh/config, trusts ~/.ssh/known_hosts and tries every key
    in ~/.ssh and the agent; its ssh CLI transport (``use_ssh_client``) cannot be given a key or known hosts at all.
    So this client has docker-py build its CLI transport, which does nothing until a request, and gives it a paramiko
    client of its own before the first request: only ``identity_file`` is offered, the host key is checked against
    ``known_hosts`` only, and a host that is not in it is refused (RejectPolicy). ~/.ssh is never read.
    """

    def __init__(self, ssh: dict[str, str], **kwargs: Any) -> None:
        self._ssh = ssh
        try:
            super().__init__(use_ssh_client=True, **kwargs)
        except BaseException:
            self.close()  # e.g. logged in, but the engine did not answer: close the ssh connection
            raise

    def mount(self, prefix: str, adapter: Any) -> None:
        if isinstance(adapter, SSHHTTPAdapter) and adapter.ssh_client is None:
            url = urlparse(f"ssh://{adapter.ssh_host}")
            timeout = adapter.timeout
            ssh_client = paramiko.SSHClient()
            try:
                ssh_client.load_host_keys(self._ssh["known_hosts"])  # neither ~/.ssh/known_hosts nor the system's
                ssh_client.set_missing_host_key_policy(paramiko.RejectPolicy())
                adapter.ssh_client = ssh_client
                adapter.ssh_params = {
                    "hostname": url.hostname,
                    "port": url.port or 22,
                    "username": url.username,
                    "key_filename": self._ssh["identity_file"],
                    "look_for_keys": False,
                    "allow_agent": False,
                    "timeout": timeout,
                    "banner_timeout": timeout,
                    "auth_timeout": timeout,
                }
                adapter._connect()
            except BaseException:
                ssh_client.close()
                raise
        super().mount(prefix, adapter)


class DockerEngines:
    """One API client and two bounded thread pools per Docker engine, shared by every server of the hub."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str], docker.APIClient] = {}
        self._pools: dict[tuple[str, str], ThreadPoolExecutor] = {}

    def client(self, host: dict[str, Any], timeout_seconds: float, purpose: str = "api") -> docker.APIClient:
        """The client for ``host`` (a ``docker_hosts`` entry); ``purpose`` "pull" gets its own, slower one."""
        key = (host.get("name", "local"), purpose)
        if key not in self._clients:
            kwargs: dict[str, Any] = {"version": "auto", "timeout": timeout_seconds}
            url = host.get("url", "")
            client_class: type[docker.APIClient] = docker.APIClient
            if url:
                kwargs["base_url"] = url
                if url.startswith("ssh://") and host.get("ssh"):
                    kwargs["ssh"] = host["ssh"]
                    client_class = _SshEngineClient
                elif url.startswith("ssh://"):
                    kwargs["use_ssh_client"] = bool(host.get("use_ssh_client", False))
            else:
                kwargs.update(docker.utils.kwargs_from_env())
            if host.get("tls"):
                kwargs["tls"] = _verified_tls(host["tls"]["ca_cert"], host["tls"].get("client_cert"))
            elif isinstance(kwargs.get("tls"), docker.tls.TLSConfig):
                # DOCKER_CERT_PATH without DOCKER_TLS_VERIFY means TLS without verification to docker-py: verify.
                kwargs["tls"] = _verified_tls(kwargs["tls"].ca_cert, kwargs["tls"].cert)
            if kwargs.get("tls"):
                client_class = _TlsEngineClient
            try:
                self._clients[key] = client_class(**kwargs)
            except (paramiko.SSHException, OSError) as e:
                # The ssh transport connects here; callers handle DockerException (paramiko's are not OSErrors).
                if not url.startswith("ssh://"):
                    raise
                ssh = host.get("ssh")
                files = f" (identity {ssh['identity_file']}, known hosts {ssh['known_hosts']})" if ssh else ""
                raise docker.errors.DockerException(
                    f"Docker host {host.get('name', 'local')!r} at {url}: ssh failed: {type(e).__name__}: {e}{files}"
                ) from e
        return self._clients[key]

    def pool(self, host: dict[str, Any], size: int, purpose: str = "api") -> ThreadPoolExecutor:
        """The thread pool for ``host`` and ``purpose`` ("api" or "pull")."""
        key = (host.get("name", "local"), purpose)
        if key not in self._pools:
            self._pools[key] = ThreadPoolExecutor(size, thread_name_prefix=f"dolab-docker-{key[0]}-{purpose}")
        return self._pools[key]


#: The hub-wide engines (one hub per process).
engines = DockerEngines()


def _verified_tls(ca_cert: str | None, client_cert: Any) -> docker.tls.TLSConfig:
    """A TLSConfig that verifies the engine against ``ca_cert`` (docker-py verifies nothing unless told to)."""
    if not ca_cert:
        raise docker.errors.TLSParameterError("a TLS engine needs ca_cert, the CA that signed its certificate")
    return docker.tls.TLSConfig(ca_cert=ca_cert, client_cert=tuple(client_cert) if client_cert else None, verify=True)


_HOST_KEYS = {"name", "url", "tls", "use_ssh_client", "ssh", "gpu_inventory", "hub_connect_url", "workspace"}
_SSH_KEYS = ("identity_file", "known_hosts")
_TLS_KEYS = {"ca_cert", "client_cert", "verify"}


def check_docker_hosts(raw: Any) -> list[dict[str, Any]]:
    """Validate ``docker_hosts``: a list of ``{name, url, tls, use_ssh_client, ssh, gpu_inventory, hub_connect_url,
    workspace}``.

    Raises ValueError with a sentence. ``gpu_inventory`` entries get the host's name as their ``host``.
    """
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError("docker_hosts must be a non-empty list of dicts such as {'name': 'local'}")
    hosts: list[dict[str, Any]] = []
    for i, entry in enumerate(raw):
        where = f"docker_hosts[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a dict, not {type(entry).__name__}")
        unknown = sorted(set(entry) - _HOST_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_HOST_KEYS))}")
        name = entry.get("name")
        if not isinstance(name, str) or not name or not all(c.isalnum() or c == "-" for c in name):
            raise ValueError(f"{where}: name must be letters, digits and -, not {name!r}")
        url = entry.get("url", "")
        if not isinstance(url, str) or (url and not url.startswith(("unix://", "tcp://", "ssh://", "http://"))):
            raise ValueError(f"{where}: url must start with unix://, tcp://, ssh:// or http://, not {url!r}")
        if entry.get("workspace", "bind") not in ("bind", "volume"):
            raise ValueError(f"{where}: workspace must be 'bind' or 'volume'")
        if not isinstance(entry.get("tls", {}), dict):
            raise ValueError(f"{where}: tls must be a dict of docker.tls.TLSConfig arguments")
        if "ssh" in entry:
            ssh = entry["ssh"]
            if not url.startswith("ssh://"):
                raise ValueError(f"{where}: ssh is only for an ssh:// url, not {url!r}")
            if entry.get("tls"):
                raise ValueError(f"{where}: ssh cannot go with tls")
            if entry.get("use_ssh_client"):
                raise ValueError(
                    f"{where}: ssh cannot go with use_ssh_client (the ssh command takes its keys and known hosts"
                    " only from ~/.ssh and /etc/ssh)"
                )
            if not isinstance(ssh, dict) or set(ssh) != set(_SSH_KEYS):
                raise ValueError(f"{where}: ssh must be a dict with exactly {' and '.join(_SSH_KEYS)}, not {ssh!r}")
            for k in _SSH_KEYS:
                if not isinstance(ssh[k], str) or not os.path.isabs(ssh[k]):
                    raise ValueError(f"{where}: ssh {k} must be an absolute path, not {ssh[k]!r}")
        if "tls" in entry:
            _check_tls(where, url, entry["tls"])
        inventory = entry.get("gpu_inventory", [])
        if not isinstance(inventory, list):
            raise ValueError(f"{where}: gpu_inventory must be a list of GPU dicts")
        for gpu in inventory:
            GpuSlot.from_dict({**gpu, "host": name} if isinstance(gpu, dict) else gpu)
        hosts.append(dict(entry))
    names = [h["name"] for h in hosts]
    if len(set(names)) != len(names):
        raise ValueError(f"docker_hosts: names must be unique, got {', '.join(names)}")
    return hosts


def _check_tls(where: str, url: str, tls: dict[str, Any]) -> None:
    """A ``tls`` entry always verifies the engine: it needs the CA, and cannot turn verification off."""
    if not url.startswith("tcp://"):
        raise ValueError(f"{where}: tls needs a tcp:// url (an http:// url is plain HTTP), not {url!r}")
    unknown = sorted(set(tls) - _TLS_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown tls key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TLS_KEYS))}")
    ca_cert = tls.get("ca_cert")
    if not isinstance(ca_cert, str) or not os.path.isabs(ca_cert):
        raise ValueError(
            f"{where}: tls needs ca_cert, the absolute path of the CA that signed the engine's certificate"
            f" (DO-LAB always verifies the engine), not {ca_cert!r}"
        )
    if tls.get("verify", True) is not True:
        raise ValueError(
            f"{where}: tls always verifies the engine's certificate against ca_cert; remove verify: {tls['verify']!r}"
        )
    cert = tls.get("client_cert")
    paths_ok = isinstance(cert, (list, tuple)) and len(cert) == 2
    if cert is not None and not (paths_ok and all(isinstance(p, str) and os.path.isabs(p) for p in cert)):
        raise ValueError(f"{where}: tls client_cert must be [certificate, key], two absolute paths, not {cert!r}")
