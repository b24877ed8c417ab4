"""The real parts the Docker tests need: two Docker engines and the single-user test image.

    .venv/bin/python tests/stack.py up       # install, start and build what is missing (quick when all is there)
    .venv/bin/python tests/stack.py status   # show .dolab/stack/stack.json and whether each engine answers
    .venv/bin/python tests/stack.py down     # remove test containers, stop what `up` started

Engine 1 is the default engine (unix:///var/run/docker.sock): used as it is when it answers, else started here.
Engine 2 stands for a second host: its own dockerd, data root, exec root, socket and Linux bridge. It also
listens on tcp://127.0.0.1:<port> with mutual TLS, as a remote GPU machine is reached: a small CA, a server
certificate for IP 127.0.0.1 and a client certificate, made once into .dolab/stack/tls and reused while they
stay valid for more than a day. It is also reached over ssh://root@127.0.0.1:<port>, as docker-py reaches a remote
machine: a private sshd (openssh-server is installed when /usr/sbin/sshd is missing; its ssh service stays off)
with its own config, host key and client key in .dolab/stack/ssh, letting in only that key, and only for
`docker system dial-stdio` to engine 2.
The image is built without any registry: debootstrap a Debian root filesystem, pip-install the hub's own
jupyterhub and jupyterlab versions into /opt/venv, add user jovyan (uid 1000), and `docker import` it. Its tag
carries a hash of the recipe, and a `docker save` of it is cached in .dolab/cache, so reruns and wiped engines
are quick. What `up` started is recorded in .dolab/stack/stack.json, and `down` stops exactly that.

Only the standard library, the docker SDK, paramiko (its ssh transport) and cryptography (a JupyterHub
dependency); run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.tls
import paramiko
import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parents[1]
DOLAB = REPO / ".dolab"
STATE = DOLAB / "stack"
CACHE = DOLAB / "cache"
BUILD = DOLAB / "build"
STACK_JSON = STATE / "stack.json"

# Bump when the build steps change in a way the Recipe fields do not show.
RECIPE_VERSION = 1
IMAGE_REPO = "dolab-singleuser-test"
EXTRA_TAGS = ("latest", "alt")  # `alt`: a second image choice for the tests (same image)
TEST_LABEL = "dolab.test=1"  # containers the tests create; `down` removes them on both engines

BRIDGE2 = "dolabbr2"
# Private /24s for engine 2's bridge, tried in order; the first that no address or route on this host overlaps.
BRIDGE2_CANDIDATES = ("10.213.213.0/24", "10.213.214.0/24", "10.231.57.0/24", "172.29.213.0/24", "192.168.213.0/24")
DATA_ROOT2 = "/var/lib/dolab-docker2"
EXEC_ROOT2 = "/run/dolab-docker2"
# Engine 2's TCP listener with mutual TLS; another free port is taken (and recorded) when this one is in use.
TLS_ADDRESS2 = "127.0.0.1"
TLS_PORT2 = 23762
TLS_DIR = STATE / "tls"
TLS_VALID_DAYS = 825
TLS_MIN_LEFT = 86400.0  # certificates with less than a day left are made again
CA_BUNDLE_ENV = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
# Engine 2 over ssh://, as docker-py reaches a remote GPU machine: a private sshd on 127.0.0.1 (another free port is
# taken, and recorded, when this one is in use) that lets in only root with the stack's client key, and only for
# `docker system dial-stdio` to engine 2. The system's ssh service is never enabled or started.
SSH_ADDRESS2 = "127.0.0.1"
SSH_PORT2 = 23722
SSH_USER2 = "root"
SSH_DIR = STATE / "ssh"
SSHD = Path("/usr/sbin/sshd")
SSHD_KEY = "sshd"  # the name `started` records
SSHD_PIDFILE = STATE / "sshd.pid"
SSHD_LOG = STATE / "sshd.log"
SSHD_PRIVSEP_DIR = Path("/run/sshd")
SSHD_NOT_TO_BE_RUN = Path("/etc/ssh/sshd_not_to_be_run")  # Debian: the ssh service's unit and init script stop here
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
SSH_SESSION_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DIAL_STDIO = "docker system dial-stdio"

ENGINE_WAIT_S = 60.0
STOP_WAIT_S = 60.0
LONG_CALL_S = 900  # docker import / load / save of a ~500 MB image
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_PIP_CONF = Path("/etc/pip.conf")
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class StackError(Exception):
    """A step of the stack failed; the message says which and why."""


@dataclass(frozen=True)
class Engine:
    """One dockerd: where it answers and how this script starts it."""

    key: str  # the name `started` records
    host: str
    pidfile: Path
    log: Path
    args: tuple[str, ...]

    @property
    def socket(self) -> Path:
        return Path(self.host.removeprefix("unix://"))


ENGINE1 = Engine(
    key="engine1",
    host="unix:///var/run/docker.sock",
    pidfile=STATE / "dockerd.pid",
    log=STATE / "dockerd.log",
    args=("-H", "unix:///var/run/docker.sock"),
)
ENGINE2 = Engine(
    key="engine2",
    host="unix:///run/dolab-docker2.sock",
    pidfile=STATE / "dockerd2.pid",
    log=STATE / "dockerd2.log",
    args=(
        "-H",
        "unix:///run/dolab-docker2.sock",
        f"--data-root={DATA_ROOT2}",
        f"--exec-root={EXEC_ROOT2}",
        f"--bridge={BRIDGE2}",
        # Engine 2 leaves iptables alone: a dockerd that programs iptables flushes the shared DOCKER chains
        # when it starts, which would drop engine 1's port mappings. Its published ports still work on the host
        # (docker-proxy), and its containers are reached through the bridge's route.
        "--iptables=false",
        "--ip-masq=false",
        # Separate containerd namespaces in case both engines ever share one system containerd.
        "--containerd-namespace=dolab2",
        "--containerd-plugins-namespace=dolab2-plugins",
    ),
)
BRIDGE_KEY = f"bridge:{BRIDGE2}"


@dataclass(frozen=True)
class Recipe:
    """Everything the image is made from; its hash names the image."""

    suite: str
    variant: str
    packages: tuple[str, ...]
    requirements: tuple[str, ...]
    user: str
    uid: int
    changes: tuple[str, ...]
    recipe_version: int = RECIPE_VERSION

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def image(self) -> str:
        return f"{IMAGE_REPO}:{self.digest}"


def hub_recipe() -> Recipe:
    """The recipe for this checkout: the hub's own jupyterhub and jupyterlab versions, so image and hub match."""
    try:
        requirements = tuple(f"{name}=={metadata.version(name)}" for name in ("jupyterhub", "jupyterlab"))
    except metadata.PackageNotFoundError as e:
        raise StackError(f"{e.name} is not installed in {sys.prefix}: run `make stack-up` (it installs .venv)") from e
    return Recipe(
        suite="bookworm",
        variant="minbase",
        packages=("python3", "python3-venv", "ca-certificates", "procps"),
        requirements=requirements,
        user="jovyan",
        uid=1000,
        changes=(
            "ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "USER jovyan",
            "WORKDIR /home/jovyan",
            'CMD ["jupyterhub-singleuser"]',
        ),
    )


# --- small helpers -------------------------------------------------------------------------------------------


@dataclass
class Timings:
    steps: list[tuple[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        print(f"==> {name}", flush=True)
        try:
            yield
        finally:
            took = time.monotonic() - start
            self.steps.append((name, took))
            print(f"    {name}: {took:.1f} s", flush=True)


def say(message: str) -> None:
    print(f"    {message}", flush=True)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; a failure raises StackError with the command and the end of its output."""
    result = subprocess.run(cmd, text=True, capture_output=True, **kwargs)
    if result.returncode != 0:
        out = (result.stdout + result.stderr).strip()[-3000:]
        raise StackError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}:\n{out}")
    return result


def ip_json(*args: str) -> list[dict[str, Any]]:
    out = run(["ip", "-j", *args]).stdout.strip()
    return json.loads(out) if out else []


def connect(host: str, timeout: float = 10, tls: docker.tls.TLSConfig | None = None) -> docker.DockerClient | None:
    """A client for the engine at `host` (over TLS with `tls`), or None when it does not answer."""
    try:
        client = docker.DockerClient(base_url=host, version="auto", timeout=timeout, tls=tls if tls else False)
        client.ping()
        return client
    except (docker.errors.DockerException, OSError):
        return None
    except Exception as e:  # requests' connection errors, which the SDK does not always wrap
        if type(e).__module__.startswith(("requests", "urllib3")):
            return None
        raise


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (not gone, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def our_dockerd(engine: Engine) -> int | None:
    """The pid of the dockerd that this script started for `engine`, if it is still running."""
    pid = read_pid(engine.pidfile)
    if pid is None or not alive(pid):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if os.path.basename(argv[0]) != b"dockerd" or f"--pidfile={engine.pidfile}".encode() not in argv:
        return None
    return pid


def load_stack() -> dict[str, Any]:
    try:
        data = json.loads(STACK_JSON.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """One `up`/`down` at a time."""
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --- step 1: packages ----------------------------------------------------------------------------------------


def have(program: str) -> bool:
    return shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is not None


def install_packages() -> None:
    missing = [p for p in ("dockerd", "debootstrap") if not have(p)]
    if not missing:
        say("dockerd and debootstrap are installed")
        return
    say(f"missing {', '.join(missing)}: installing docker.io and debootstrap")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "docker.io", "debootstrap"], env=env)
    still = [p for p in ("dockerd", "debootstrap") if not have(p)]
    if still:
        raise StackError(f"apt-get installed docker.io and debootstrap, but {', '.join(still)} is still missing")


# --- steps 2 and 3: engines ----------------------------------------------------------------------------------


def start_engine(engine: Engine) -> None:
    """Start `engine`'s dockerd in its own session and wait until it answers."""
    STATE.mkdir(parents=True, exist_ok=True)
    pid = our_dockerd(engine)
    if pid is None:
        dockerd = shutil.which("dockerd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or "dockerd"
        cmd = [dockerd, *engine.args, f"--pidfile={engine.pidfile}"]
        with open(engine.log, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        pid = proc.pid
        say(f"started dockerd for {engine.key} (pid {pid}, log {engine.log.relative_to(REPO)})")
    else:
        say(f"dockerd for {engine.key} is running (pid {pid}) but does not answer yet; waiting")
    deadline = time.monotonic() + ENGINE_WAIT_S
    while time.monotonic() < deadline:
        if connect(engine.host, timeout=5) is not None:
            return
        if not alive(pid):
            break
        time.sleep(0.3)
    tail = engine.log.read_text(errors="replace")[-3000:] if engine.log.exists() else ""
    state = "exited" if not alive(pid) else f"did not answer on {engine.host} within {ENGINE_WAIT_S:.0f} s"
    raise StackError(f"dockerd for {engine.key} {state}. End of {engine.log}:\n{tail}")


def ensure_engine(engine: Engine, started: list[str], started_now: list[str]) -> docker.DockerClient:
    """`engine` answering, started here when it does not; returns a client for long calls (load, import)."""
    if connect(engine.host) is not None:
        if our_dockerd(engine) is not None:
            say(f"{engine.key} answers on {engine.host} (started by an earlier `up`)")
            started.append(engine.key)
        else:
            say(f"{engine.key} answers on {engine.host} (not started here: it stays up after `down`)")
    else:
        start_engine(engine)
        started.append(engine.key)
        started_now.append(engine.key)
    return docker.DockerClient(base_url=engine.host, version="auto", timeout=LONG_CALL_S)


# --- engine 2 over TCP with mutual TLS -----------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """The CA, engine 2's server certificate and key, and the client certificate and key, as files in `root`."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server-cert.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server-key.pem"

    @property
    def cert(self) -> Path:
        return self.root / "cert.pem"

    @property
    def key(self) -> Path:
        return self.root / "key.pem"

    def dockerd_args(self, port: int) -> tuple[str, ...]:
        return (
            "-H",
            f"tcp://{TLS_ADDRESS2}:{port}",
            "--tlsverify",
            f"--tlscacert={self.ca}",
            f"--tlscert={self.server_cert}",
            f"--tlskey={self.server_key}",
        )

    def record(self) -> dict[str, Any]:
        """What stack.json says: the keyword arguments of docker.tls.TLSConfig."""
        return {"ca_cert": str(self.ca), "client_cert": [str(self.cert), str(self.key)], "verify": True}

    def config(self, client_cert: bool = True) -> docker.tls.TLSConfig:
        return docker.tls.TLSConfig(
            ca_cert=str(self.ca), client_cert=(str(self.cert), str(self.key)) if client_cert else None, verify=True
        )


TLS_FILES = TlsFiles(TLS_DIR)


def tls_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DO-LAB test stack"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier | None,
    now: datetime,
) -> x509.Certificate:
    """A certificate for `key`: the CA's own when `usage` is None, else a leaf for that extended key usage."""
    is_ca = usage is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=TLS_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if usage is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        ).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(TLS_ADDRESS2))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def write_secret(path: Path, data: bytes, mode: int) -> None:
    """Write `path` through a temporary file that has `mode` from the start."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
    tmp.replace(path)


def make_tls(files: TlsFiles) -> None:
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = tls_name("DO-LAB test stack CA")
    ca = issue(ca_name, ca_key, ca_name, ca_key, None, now)
    pem = serialization.Encoding.PEM
    for cert_path, key_path, common_name, usage in (
        (files.server_cert, files.server_key, TLS_ADDRESS2, ExtendedKeyUsageOID.SERVER_AUTH),
        (files.cert, files.key, "dolab-test-client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        write_secret(key_path, key_pem, 0o600)
        write_secret(cert_path, issue(tls_name(common_name), key, ca_name, ca_key, usage, now).public_bytes(pem), 0o644)
    write_secret(files.ca, ca.public_bytes(pem), 0o644)


def tls_problem(files: TlsFiles) -> str | None:
    """Why the certificates in `files` cannot be used (another day) as they are, or None when they can."""
    try:
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
        pairs = [
            (path.name, x509.load_pem_x509_certificate(path.read_bytes()), key_path, usage)
            for path, key_path, usage in (
                (files.server_cert, files.server_key, ExtendedKeyUsageOID.SERVER_AUTH),
                (files.cert, files.key, ExtendedKeyUsageOID.CLIENT_AUTH),
            )
        ]
        now = datetime.now(timezone.utc)
        for name, cert in [(files.ca.name, ca), *((name, cert) for name, cert, _, _ in pairs)]:
            if (cert.not_valid_after_utc - now).total_seconds() < TLS_MIN_LEFT:
                return f"{name} expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            if cert.not_valid_before_utc > now:
                return f"{name} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        for name, cert, key_path, usage in pairs:
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                return f"{name} is not signed by {files.ca.name}"
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
                return f"{key_path.name} is not the key of {name}"
            if usage not in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value:
                return f"{name} lacks extended key usage {usage.dotted_string}"
            if usage == ExtendedKeyUsageOID.SERVER_AUTH:
                ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                if ipaddress.ip_address(TLS_ADDRESS2) not in ips.get_values_for_type(x509.IPAddress):
                    return f"{name} is not for IP {TLS_ADDRESS2}"
    except FileNotFoundError as e:
        return f"{Path(str(e.filename)).name} is missing"
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound) as e:
        return f"unusable ({e})"
    return None


def ensure_tls() -> tuple[TlsFiles, bool]:
    """The TLS files, made now when missing or no longer good; returns them and whether they were made now."""
    files = TLS_FILES
    files.root.mkdir(parents=True, exist_ok=True)
    os.chmod(files.root, 0o700)
    problem = tls_problem(files)
    if problem is None:
        for key in (files.server_key, files.key):
            os.chmod(key, 0o600)
        until = x509.load_pem_x509_certificate(files.cert.read_bytes()).not_valid_after_utc
        say(f"TLS certificates in {files.root.relative_to(REPO)} reused (client certificate until {until:%Y-%m-%d})")
        return files, False
    make_tls(files)
    if tls_problem(files) is not None:
        raise StackError(f"the TLS certificates just made in {files.root} are unusable: {tls_problem(files)}")
    say(f"TLS certificates made in {files.root.relative_to(REPO)} ({problem})")
    return files, True


def tls_host(port: int) -> str:
    return f"tcp://{TLS_ADDRESS2}:{port}"


def recorded_port(host: str) -> int | None:
    match = re.fullmatch(rf"tcp://{re.escape(TLS_ADDRESS2)}:(\d+)", host)
    return int(match.group(1)) if match else None


def listener_port(pid: int, files: TlsFiles) -> int | None:
    """The port our engine 2 dockerd (`pid`) listens on with these TLS files, or None when it has no such listener."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return None
    for flag, value in itertools.pairwise(argv):
        port = recorded_port(value) if flag in ("-H", "--host") else None
        if port is not None and set(files.dockerd_args(port)) <= set(argv):
            return port
    return None


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as dockerd binds: TIME_WAIT does not block it
        try:
            s.bind((TLS_ADDRESS2, port))
        except OSError:
            return False
    return True


def choose_tls_port(files: TlsFiles, previous: dict[str, Any]) -> int:
    """Engine 2's TLS port: the one it listens on now, else TLS_PORT2, the recorded one, or any free port."""
    pid = our_dockerd(ENGINE2)
    if pid is not None and (port := listener_port(pid, files)) is not None:
        return port
    candidates = [TLS_PORT2]
    recorded = recorded_port(str(previous.get("docker_host_2_tls", "")))
    if recorded is not None and recorded != TLS_PORT2:
        candidates.append(recorded)
    for port in candidates:
        if port_free(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((TLS_ADDRESS2, 0))
        port = int(s.getsockname()[1])
    say(f"port {TLS_PORT2} is in use: engine 2 listens for TLS on {port} instead")
    return port


@contextlib.contextmanager
def without_ca_bundle_env() -> Iterator[None]:
    """requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override TLSConfig's ca_cert (docker/docker-py#2433):
    unset them while the engine's own CA is what must verify it."""
    saved = {name: os.environ.pop(name) for name in CA_BUNDLE_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def check_tls(host: str, files: TlsFiles) -> str:
    """Engine 2 answers on `host` with the client certificate and refuses a client without one; returns its version."""
    with without_ca_bundle_env():
        return check_tls_now(host, files)


def check_tls_now(host: str, files: TlsFiles) -> str:
    deadline = time.monotonic() + 15
    while (client := connect(host, tls=files.config())) is None:
        if time.monotonic() > deadline:
            try:
                docker.DockerClient(base_url=host, version="auto", timeout=5, tls=files.config()).ping()
                why = "it answers only now"
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
            raise StackError(f"engine 2 does not answer on {host} over TLS with the client certificate: {why}")
        time.sleep(0.3)
    version = str(client.version().get("Version", "?"))
    client.close()
    try:
        bare = docker.DockerClient(base_url=host, version=client.api.api_version, timeout=10, tls=files.config(False))
        bare.version()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError):
        pass  # refused, as it must be
    else:
        raise StackError(f"engine 2 on {host} answered a client without the client certificate")
    return version


def ensure_tls_listener(engine2: Engine, files: TlsFiles, made: bool, started_now: list[str]) -> str:
    """Engine 2 listening on its TLS port with `files` (restarted when it does not); returns that tcp:// host.

    An engine 2 that this script did not start is left as it is: then there is no TLS host, and "" is returned.
    """
    host = next(a for a in engine2.args if a.startswith("tcp://"))
    port = recorded_port(host)
    pid = our_dockerd(ENGINE2)
    if pid is None:
        say(f"WARNING: engine 2 on {ENGINE2.host} was not started here: no TLS listener, tests over TLS cannot run")
        return ""
    fresh = ENGINE2.key in started_now
    if listener_port(pid, files) != port or (made and not fresh):
        why = "new certificates" if listener_port(pid, files) == port else "no TLS listener yet"
        say(f"restarting engine 2 ({why}): its containers stop")
        stop_engine(ENGINE2)
        start_engine(engine2)
        fresh = True
    try:
        version = check_tls(host, files)
    except StackError as e:
        if fresh:
            raise
        say(f"restarting engine 2: {e}")
        stop_engine(ENGINE2)
        start_engine(engine2)
        version = check_tls(host, files)
        fresh = True
    if fresh and ENGINE2.key not in started_now:
        started_now.append(ENGINE2.key)
    say(f"engine 2 answers on {host} over mutual TLS (Docker {version}); refused without the client certificate")
    return host


def tls_config(record: dict[str, Any]) -> docker.tls.TLSConfig:
    """A TLSConfig from stack.json's `tls_2`."""
    cert = record.get("client_cert")
    return docker.tls.TLSConfig(
        ca_cert=record.get("ca_cert"), client_cert=tuple(cert) if cert else None, verify=record.get("verify", True)
    )


# --- engine 2 over ssh:// -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshFiles:
    """The stack's sshd and its client, as files in `root` (0700): keys, config, known_hosts, the forced command."""

    root: Path

    @property
    def host_key(self) -> Path:
        return self.root / "ssh_host_ed25519_key"

    @property
    def client_key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.root / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def config(self) -> Path:
        return self.root / "sshd_config"

    @property
    def dial(self) -> Path:
        return self.root / "dial-engine2"

    def record(self) -> dict[str, str]:
        """What stack.json says: the `ssh` settings of a docker_hosts entry."""
        return {"identity_file": str(self.client_key), "known_hosts": str(self.known_hosts)}


SSH_FILES = SshFiles(SSH_DIR)


def ssh_host(port: int) -> str:
    return f"ssh://{SSH_USER2}@{SSH_ADDRESS2}:{port}"


def public_key(path: Path) -> str | None:
    """`path`'s public key ("type base64"), when `path` and `path`.pub hold one key pair; else None."""
    pub = Path(f"{path}.pub")
    if not path.exists() or not pub.exists():
        return None
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], text=True, capture_output=True)
    if derived.returncode != 0:
        return None
    mine, stored = derived.stdout.split()[:2], pub.read_text().split()[:2]
    return " ".join(mine) if mine == stored and mine[0] == "ssh-ed25519" else None


def ensure_ssh_keys(files: SshFiles) -> tuple[str, str, bool]:
    """The host and client key pairs (ed25519), made when missing or broken; returns both public keys and
    whether one was made now."""
    files.root.mkdir(parents=True, exist_ok=True)
    os.chmod(files.root, 0o700)
    made = False
    keys = []
    for path, comment in ((files.host_key, "dolab-stack-sshd"), (files.client_key, "dolab-stack-client")):
        key = public_key(path)
        if key is None:
            path.unlink(missing_ok=True)
            Path(f"{path}.pub").unlink(missing_ok=True)
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
            key = public_key(path)
            if key is None:
                raise StackError(f"ssh-keygen made {path}, but it is not a usable ed25519 key pair")
            made = True
        os.chmod(path, 0o600)
        keys.append(key)
    say(f"ssh keys in {files.root.relative_to(REPO)} " + ("made" if made else "reused"))
    return keys[0], keys[1], made


def docker_cli_with_dial_stdio() -> str:
    """The first docker CLI on the ssh session's PATH that has `docker system dial-stdio`."""
    for directory in SSH_SESSION_PATH.split(":"):
        cli = Path(directory) / "docker"
        if cli.is_file() and os.access(cli, os.X_OK):
            probe = subprocess.run([str(cli), "system", "dial-stdio", "--help"], capture_output=True, timeout=30)
            if probe.returncode == 0:
                return str(cli)
    raise StackError(f"no docker CLI with `{DIAL_STDIO}` on {SSH_SESSION_PATH} (install docker.io)")


def secure_path(path: Path) -> bool:
    """Whether sshd's StrictModes accepts files in `path`: it and every directory above it owned by root and
    not writable by group or others."""
    for part in (path, *path.parents):
        st = part.stat()
        if st.st_uid != 0 or st.st_mode & 0o022:
            return False
    return True


def write_if_changed(path: Path, text: str, mode: int) -> bool:
    """Write `text` to `path` (with `mode`) unless it is there already; returns whether it was written."""
    if path.exists() and path.read_text() == text:
        os.chmod(path, mode)
        return False
    write_secret(path, text.encode(), mode)
    return True


def write_ssh_config(files: SshFiles, port: int, host_pub: str, client_pub: str) -> bool:
    """sshd's config, authorized_keys, the forced command and the client's known_hosts for `port`; returns
    whether something sshd itself reads at start (its config) changed."""
    cli = docker_cli_with_dial_stdio()
    dial = f"""#!/bin/sh
# Written by tests/stack.py. The stack's sshd runs this for every login with the client key (authorized_keys
# command=): only what docker-py's ssh transport asks for, and always to engine 2, never to the default engine.
if [ "$SSH_ORIGINAL_COMMAND" != "{DIAL_STDIO}" ]; then
    echo "this key may only run: {DIAL_STDIO}" >&2
    exit 1
fi
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH
PATH={SSH_SESSION_PATH}
DOCKER_HOST={ENGINE2.host}
export PATH DOCKER_HOST
exec {shlex.quote(cli)} system dial-stdio
"""
    write_if_changed(files.dial, dial, 0o700)
    command = shlex.quote(str(files.dial)).replace('"', '\\"')
    write_if_changed(files.authorized_keys, f'restrict,command="{command}" {client_pub} dolab-stack-client\n', 0o600)
    write_if_changed(files.known_hosts, f"[{SSH_ADDRESS2}]:{port} {host_pub}\n", 0o644)
    config = f"""# Written by tests/stack.py: the test stack's own sshd (not the system's), for engine 2 over ssh.
ListenAddress {SSH_ADDRESS2}:{port}
AddressFamily inet
HostKey {files.host_key}
PidFile {SSHD_PIDFILE}
AuthorizedKeysFile {files.authorized_keys}
AuthorizedPrincipalsFile none
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
PermitRootLogin prohibit-password
AllowUsers {SSH_USER2}
PermitUserEnvironment no
StrictModes {"yes" if secure_path(files.root) else "no"}
UsePAM no
DisableForwarding yes
PermitTunnel no
PrintMotd no
PrintLastLog no
UseDNS no
LogLevel VERBOSE
"""
    return write_if_changed(files.config, config, 0o600)


def configured_ssh_port(files: SshFiles) -> int | None:
    try:
        text = files.config.read_text()
    except OSError:
        return None
    match = re.search(rf"^ListenAddress {re.escape(SSH_ADDRESS2)}:(\d+)$", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def our_sshd(files: SshFiles = SSH_FILES) -> int | None:
    """The pid of the sshd that this script started with `files`' config, if it is still running."""
    pid = read_pid(SSHD_PIDFILE)
    if pid is None or not alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()  # sshd rewrites it, keeping its arguments
    except OSError:
        return None
    return pid if b"sshd" in cmdline and str(files.config).encode() in cmdline else None


def choose_ssh_port(files: SshFiles, previous: dict[str, Any]) -> int:
    """The sshd's port: the one our sshd listens on now, else SSH_PORT2, the recorded one, or any free port."""
    if our_sshd(files) is not None and (port := configured_ssh_port(files)) is not None:
        return port
    candidates = [SSH_PORT2]
    match = re.fullmatch(rf"ssh://[^@]+@{re.escape(SSH_ADDRESS2)}:(\d+)", str(previous.get("docker_host_2_ssh", "")))
    if match and int(match.group(1)) != SSH_PORT2:
        candidates.append(int(match.group(1)))
    for port in candidates:
        if port_free(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((SSH_ADDRESS2, 0))
        port = int(s.getsockname()[1])
    say(f"port {SSH_PORT2} is in use: the stack's sshd listens on {port} instead")
    return port


def install_sshd() -> None:
    """openssh-server, for /usr/sbin/sshd only: its ssh service is neither started now nor at boot."""
    if SSHD.exists():
        say(f"{SSHD} is installed")
        return
    say(f"missing {SSHD}: installing openssh-server (its ssh service stays off: {SSHD_NOT_TO_BE_RUN})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    SSHD_NOT_TO_BE_RUN.parent.mkdir(parents=True, exist_ok=True)
    SSHD_NOT_TO_BE_RUN.write_text("tests/stack.py installed openssh-server for its own sshd only\n")
    ours = not POLICY_RC_D.exists()  # no service starts while the package installs
    if ours:
        POLICY_RC_D.write_text("#!/bin/sh\n# tests/stack.py, while it installs openssh-server\nexit 101\n")
        os.chmod(POLICY_RC_D, 0o755)
    try:
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "openssh-server"], env=env)
    finally:
        if ours:
            POLICY_RC_D.unlink(missing_ok=True)
    if not SSHD.exists():
        raise StackError(f"apt-get installed openssh-server, but {SSHD} is still missing")
    # The package's postinst enables its ssh service; disable it again (sshd_not_to_be_run keeps it off anyway).
    # update-rc.d also disables the systemd unit where systemctl is there.
    if have("update-rc.d"):
        subprocess.run(["update-rc.d", "ssh", "disable"], capture_output=True, env=env)


def start_sshd(files: SshFiles, port: int) -> None:
    """Start the stack's sshd (it daemonizes) and wait until it listens."""
    SSHD_PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    run([str(SSHD), "-t", "-f", str(files.config)])
    SSHD_PIDFILE.unlink(missing_ok=True)
    with open(SSHD_LOG, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {SSHD} -f {files.config}\n".encode())
    result = subprocess.run(
        [str(SSHD), "-f", str(files.config), "-E", str(SSHD_LOG)], capture_output=True, text=True, timeout=30
    )
    deadline = time.monotonic() + 15
    while result.returncode == 0 and time.monotonic() < deadline:
        if our_sshd(files) is not None and not port_free(port):
            say(f"started sshd (pid {our_sshd(files)}) on {SSH_ADDRESS2}:{port}, log {SSHD_LOG.relative_to(REPO)}")
            return
        time.sleep(0.1)
    tail = SSHD_LOG.read_text(errors="replace")[-3000:] if SSHD_LOG.exists() else ""
    raise StackError(
        f"sshd did not start on {SSH_ADDRESS2}:{port} ({result.stdout}{result.stderr}). End of log:\n{tail}"
    )


def stop_sshd() -> None:
    pid = our_sshd()
    if pid is None:
        print("  sshd: none of ours is running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
    SSHD_PIDFILE.unlink(missing_ok=True)
    print(f"  sshd: stopped {pid}")


def engine_identity(info: dict[str, Any]) -> str:
    """Which engine answered `GET /info`: its ID and data root. Docker 20.10 takes the ID from /etc/docker/key.json,
    which both engines share here; the data root tells them apart."""
    return f"{info.get('ID')} {info.get('DockerRootDir')}"


def engine_over_ssh(port: int, record: dict[str, Any], timeout: float = 10) -> str:
    """engine_identity() of what `docker system dial-stdio` over ssh reaches (with the client key, host key checked)."""
    client = paramiko.SSHClient()
    client.load_host_keys(record["known_hosts"])
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            SSH_ADDRESS2,
            port=port,
            username=SSH_USER2,
            key_filename=record["identity_file"],
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )
        transport = client.get_transport()
        assert transport is not None
        channel = transport.open_session(timeout=timeout)
        channel.settimeout(timeout)
        channel.exec_command(DIAL_STDIO)
        channel.sendall(b"GET /info HTTP/1.0\r\nHost: docker\r\n\r\n")
        reply = b""
        while chunk := channel.recv(1 << 16):
            reply += chunk
    finally:
        client.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0]:
        raise StackError(f"`{DIAL_STDIO}` over ssh did not answer GET /info: {reply[:300]!r}")
    return engine_identity(json.loads(body))


def ssh_status(host: str, record: dict[str, Any]) -> str:
    match = re.fullmatch(r"ssh://[^@]+@[^:]+:(\d+)", host)
    if not match:
        return f"unusable host {host!r}"
    try:
        reached = engine_over_ssh(int(match.group(1)), record, timeout=3)
    except (paramiko.SSHException, OSError, StackError, KeyError, ValueError) as e:
        return f"does not answer over ssh: {type(e).__name__}: {e}"
    engine2 = connect(ENGINE2.host, timeout=3)
    same = engine2 is not None and engine_identity(engine2.info()) == reached
    return "answers over ssh" + (" (engine 2)" if same else f", but reaches {reached}, not engine 2")


def ensure_ssh(previous: dict[str, Any], started: list[str], started_now: list[str]) -> tuple[str, dict[str, str]]:
    """The stack's sshd in front of engine 2, checked end to end; returns the ssh:// host and its `ssh` settings."""
    files = SSH_FILES
    install_sshd()
    host_pub, client_pub, made = ensure_ssh_keys(files)
    port = choose_ssh_port(files, previous)
    config_changed = write_ssh_config(files, port, host_pub, client_pub)
    pid = our_sshd(files)
    if pid is not None and (config_changed or made):
        say("restarting sshd (" + ("new keys" if made else "new config") + ")")
        stop_sshd()
        pid = None
    if pid is None:
        start_sshd(files, port)
        started_now.append(SSHD_KEY)
    else:
        say(f"sshd answers on {SSH_ADDRESS2}:{port} (pid {pid}, started by an earlier `up`)")
    started.append(SSHD_KEY)
    record = files.record()
    engine2 = engine_identity(docker.APIClient(base_url=ENGINE2.host, version="auto", timeout=30).info())
    deadline = time.monotonic() + 15
    while True:
        try:
            reached = engine_over_ssh(port, record)
            break
        except (paramiko.SSHException, OSError, StackError) as e:
            if time.monotonic() > deadline:
                tail = SSHD_LOG.read_text(errors="replace")[-2000:] if SSHD_LOG.exists() else ""
                raise StackError(
                    f"engine 2 does not answer over {ssh_host(port)}: {e}. End of {SSHD_LOG}:\n{tail}"
                ) from None
            time.sleep(0.3)
    if reached != engine2:
        raise StackError(f"{ssh_host(port)} reached engine {reached}, not engine 2 ({engine2})")
    say(f"engine 2 answers on {ssh_host(port)} (`{DIAL_STDIO}` with the client key; host key checked)")
    return ssh_host(port), record


def host_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for link in ip_json("-4", "addr"):
        for a in link.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for route in ip_json("-4", "route"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


def bridge_ipv4(name: str) -> str | None:
    try:
        links = ip_json("-4", "addr", "show", "dev", name)
    except StackError:
        return None
    for link in links:
        for a in link.get("addr_info", []):
            return str(a["local"])
    return None


def ensure_bridge2(started: list[str], started_now: list[str], was_ours: bool) -> str:
    """Engine 2's bridge with a private /24 that nothing else on this host uses; returns its address."""
    exists = subprocess.run(["ip", "link", "show", BRIDGE2], capture_output=True).returncode == 0
    if not exists:
        run(["ip", "link", "add", "name", BRIDGE2, "type", "bridge"])
        started_now.append(BRIDGE_KEY)
        was_ours = True
    address = bridge_ipv4(BRIDGE2)
    if address is None:
        taken = host_networks()
        for candidate in BRIDGE2_CANDIDATES:
            net = ipaddress.IPv4Network(candidate)
            if not any(net.overlaps(t) for t in taken):
                address = str(next(net.hosts()))
                run(["ip", "addr", "add", f"{address}/{net.prefixlen}", "dev", BRIDGE2])
                break
        else:
            raise StackError(f"every candidate subnet for {BRIDGE2} overlaps this host's networks: {taken}")
    run(["ip", "link", "set", BRIDGE2, "up"])
    if was_ours:
        started.append(BRIDGE_KEY)
    say(f"bridge {BRIDGE2} at {address}" + (" (created)" if not exists else ""))
    return address


def engine1_bridge_ip(client: docker.DockerClient) -> str:
    """Engine 1's default bridge address (docker0), which containers reach the host on."""
    network = client.networks.get("bridge")
    name = network.attrs.get("Options", {}).get("com.docker.network.bridge.name", "docker0")
    address = bridge_ipv4(name)
    if address:
        return address
    for cfg in network.attrs.get("IPAM", {}).get("Config") or []:
        if cfg.get("Gateway"):
            return str(cfg["Gateway"])
    raise StackError(f"cannot find engine 1's bridge address (interface {name})")


# --- step 4: the image ---------------------------------------------------------------------------------------


def has_image(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False


def tag_extras(client: docker.DockerClient, recipe: Recipe) -> None:
    image = client.images.get(recipe.image)
    for tag in EXTRA_TAGS:
        name = f"{IMAGE_REPO}:{tag}"
        if name not in image.tags:
            image.tag(IMAGE_REPO, tag)


def cache_path(recipe: Recipe) -> Path:
    return CACHE / f"{IMAGE_REPO}-{recipe.digest}.tar"


def save_cache(client: docker.DockerClient, recipe: Recipe) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    target = cache_path(recipe)
    partial = target.with_suffix(".tar.partial")
    with open(partial, "wb") as f:
        for chunk in client.images.get(recipe.image).save(named=True):
            f.write(chunk)
    partial.replace(target)
    for old in CACHE.glob(f"{IMAGE_REPO}-*.tar*"):
        if old != target:
            old.unlink()
    say(f"cached {target.relative_to(REPO)} ({target.stat().st_size / 2**20:.0f} MiB)")


def load_cache(client: docker.DockerClient, recipe: Recipe) -> bool:
    target = cache_path(recipe)
    if not target.exists():
        return False
    with open(target, "rb") as f:
        client.images.load(f)
    if not has_image(client, recipe.image):
        raise StackError(f"loading {target} did not give {recipe.image}; delete the file and rerun")
    return True


def debian_mirror() -> str:
    """The Debian mirror this host's apt uses (the first URIs of the stanza for the main suite)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for stanza in re.split(r"\n\s*\n", sources.read_text()):
            fields = dict(
                (k.strip(), v.strip())
                for k, v in (line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[:1] != "#")
            )
            uris = fields.get("URIs", "").split()
            if uris and "-security" not in uris[0]:
                return uris[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1] if not parts[1].startswith("[") else parts[2]
    return DEFAULT_MIRROR


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    root = os.path.realpath(path)
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
        if point == root or point.startswith(root + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_all(path: Path) -> None:
    for point in mounts_under(path):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
    left = mounts_under(path)
    if left:
        raise StackError(f"cannot unmount {left}; unmount them by hand before deleting {path}")


def remove_tree(path: Path) -> None:
    """Delete a build tree, never through a mount (a bound /dev must not be emptied)."""
    if path.exists():
        unmount_all(path)
        shutil.rmtree(path)


@contextlib.contextmanager
def chroot_mounts(rootfs: Path) -> Iterator[None]:
    """/dev and /proc inside the root filesystem, unmounted again whatever happens."""
    try:
        (rootfs / "dev").mkdir(exist_ok=True)
        (rootfs / "proc").mkdir(exist_ok=True)
        run(["mount", "--bind", "/dev", str(rootfs / "dev")])
        run(["mount", "-t", "proc", "proc", str(rootfs / "proc")])
        yield
    finally:
        unmount_all(rootfs / "proc")
        unmount_all(rootfs / "dev")


def chroot_env() -> dict[str, str]:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PIP_CERT": str(HOST_CA_BUNDLE),
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_DEFAULT_TIMEOUT": os.environ.get("PIP_DEFAULT_TIMEOUT", "120"),
    }
    # How this host reaches PyPI, where it is set in the environment (PIP_FIND_LINKS is a host path: left out).
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "http_proxy", "https_proxy", "no_proxy"):
        for variant in (name, name.upper()):
            if variant in os.environ:
                env[variant] = os.environ[variant]
    return env


def build_image(client: docker.DockerClient, recipe: Recipe, timings: Timings) -> None:
    """debootstrap, pip install, add the user, docker import: no registry is involved."""
    BUILD.mkdir(parents=True, exist_ok=True)
    for stale in BUILD.glob("rootfs-*"):
        remove_tree(stale)
    rootfs = BUILD / f"rootfs-{recipe.digest}"
    try:
        with timings.step("image: debootstrap"):
            mirror = debian_mirror()
            say(f"debootstrap {recipe.suite} from {mirror}")
            run(
                [
                    "debootstrap",
                    f"--variant={recipe.variant}",
                    f"--include={','.join(recipe.packages)}",
                    recipe.suite,
                    str(rootfs),
                    mirror,
                ]
            )
        with timings.step("image: pip install"):
            # The host's CA bundle (it trusts the TLS-intercepting setup PyPI is reached through) and pip config.
            target_ca = rootfs / HOST_CA_BUNDLE.relative_to("/")
            target_ca.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HOST_CA_BUNDLE, target_ca)
            if HOST_PIP_CONF.exists():
                shutil.copyfile(HOST_PIP_CONF, rootfs / HOST_PIP_CONF.relative_to("/"))
            if Path("/etc/resolv.conf").exists():
                (rootfs / "etc/resolv.conf").unlink(missing_ok=True)
                shutil.copyfile("/etc/resolv.conf", rootfs / "etc/resolv.conf")
            script = " && ".join(
                [
                    "python3 -m venv /opt/venv",
                    "/opt/venv/bin/pip install --quiet " + " ".join(recipe.requirements),
                    f"useradd --uid {recipe.uid} --user-group --create-home --home-dir /home/{recipe.user}"
                    f" --shell /bin/bash {recipe.user}",
                    f"mkdir -p /home/{recipe.user}/work",
                    f"chown -R {recipe.uid}:{recipe.uid} /home/{recipe.user}",
                    "rm -rf /var/cache/apt/archives/*.deb /var/lib/apt/lists/* /root/.cache",
                ]
            )
            with chroot_mounts(rootfs):
                run(["chroot", str(rootfs), "/bin/sh", "-c", script], env=chroot_env())
        with timings.step("image: docker import"):
            tar = subprocess.Popen(
                ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert tar.stdout is not None

            def chunks() -> Iterator[bytes]:
                assert tar.stdout is not None
                while chunk := tar.stdout.read(1 << 20):
                    yield chunk

            try:
                reply = client.api.import_image(
                    src=chunks(),
                    stream_src=True,
                    repository=IMAGE_REPO,
                    tag=recipe.digest,
                    changes=list(recipe.changes),
                )
            finally:
                tar.stdout.close()
                tar_err = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
                tar_rc = tar.wait()
            if tar_rc != 0:
                raise StackError(f"tar of {rootfs} failed ({tar_rc}): {tar_err[-2000:]}")
            if "errorDetail" in str(reply) or not has_image(client, recipe.image):
                raise StackError(f"docker import of {rootfs} failed: {str(reply)[-2000:]}")
    finally:
        with timings.step("image: delete build tree"):
            remove_tree(rootfs)
    with timings.step("image: docker save to cache"):
        save_cache(client, recipe)


def ensure_image(client: docker.DockerClient, recipe: Recipe, timings: Timings, engine: Engine) -> str:
    """Give `engine` the image (and its extra tags): present, else from the cache tarball, else built."""
    how = "present"
    if not has_image(client, recipe.image):
        if load_cache(client, recipe):
            how = f"loaded from {cache_path(recipe).relative_to(REPO)}"
        elif engine is ENGINE1:
            build_image(client, recipe, timings)
            how = "built"
        else:
            raise StackError(f"no cache tarball {cache_path(recipe)} to load into {engine.key}")
    tag_extras(client, recipe)
    say(f"{engine.key}: {recipe.image} {how}")
    return how


# --- commands ------------------------------------------------------------------------------------------------


def up() -> int:
    timings = Timings()
    total = time.monotonic()
    previous = load_stack()
    started: list[str] = []
    started_now: list[str] = []
    with locked():
        with timings.step("packages"):
            install_packages()
        with timings.step("engine 1"):
            client1 = ensure_engine(ENGINE1, started, started_now)
            bridge_ip = engine1_bridge_ip(client1)
        with timings.step("engine 2"):
            ours2 = our_dockerd(ENGINE2) is not None or "engine2" in previous.get("started", [])
            bridge_ip_2 = ensure_bridge2(started, started_now, BRIDGE_KEY in previous.get("started", []) or ours2)
            tls_files, made = ensure_tls()
            engine2 = replace(ENGINE2, args=ENGINE2.args + tls_files.dockerd_args(choose_tls_port(tls_files, previous)))
            ensure_engine(engine2, started, started_now)
            host_2_tls = ensure_tls_listener(engine2, tls_files, made, started_now)
            client2 = docker.DockerClient(base_url=ENGINE2.host, version="auto", timeout=LONG_CALL_S)  # after a restart
        with timings.step("engine 2 over ssh"):
            host_2_ssh, ssh_2 = ensure_ssh(previous, started, started_now)
        recipe = hub_recipe()
        with timings.step("image on engine 1"):
            say(f"recipe {recipe.digest}: {recipe.suite} {' '.join(recipe.requirements)}")
            ensure_image(client1, recipe, timings, ENGINE1)
        with timings.step("image on engine 2"):
            # Engine 2 loads the image from the tarball a build leaves; one that came from elsewhere (a clean clone
            # beside engines that kept their images) is saved only when engine 2 lacks it, not on every run.
            if not has_image(client2, recipe.image) and not cache_path(recipe).exists():
                save_cache(client1, recipe)
            ensure_image(client2, recipe, timings, ENGINE2)
        stack = {
            "docker_host": ENGINE1.host,
            "docker_host_2": ENGINE2.host,
            "docker_host_2_tls": host_2_tls,
            "tls_2": tls_files.record() if host_2_tls else {},
            "docker_host_2_ssh": host_2_ssh,
            "ssh_2": ssh_2,
            "bridge_ip": bridge_ip,
            "bridge_ip_2": bridge_ip_2,
            "image": recipe.image,
            "images": [recipe.image, *(f"{IMAGE_REPO}:{t}" for t in EXTRA_TAGS)],
            "started": sorted(set(started)),
            "started_this_run": started_now,
        }
        tmp = STACK_JSON.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(stack, indent=2) + "\n")
        tmp.replace(STACK_JSON)
    print(f"\nstack up in {time.monotonic() - total:.1f} s ({STACK_JSON.relative_to(REPO)}):")
    for name, took in timings.steps:
        print(f"  {took:7.1f} s  {name}")
    print(f"  engine 1 {ENGINE1.host} (bridge {bridge_ip}), engine 2 {ENGINE2.host} (bridge {bridge_ip_2})")
    print(f"  engine 2 over mutual TLS: {host_2_tls or 'none'} (certificates in {tls_files.root.relative_to(REPO)})")
    print(f"  engine 2 over ssh: {host_2_ssh} (keys and known_hosts in {SSH_FILES.root.relative_to(REPO)})")
    print(f"  image {recipe.image}; started now: {', '.join(started_now) or 'nothing'}")
    return 0


def remove_test_containers(engine: Engine) -> None:
    client = connect(engine.host)
    if client is None:
        return
    for container in client.containers.list(all=True, filters={"label": TEST_LABEL}):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
            print(f"  removed container {container.name} from {engine.key}")


def stop_engine(engine: Engine) -> None:
    pid = our_dockerd(engine)
    if pid is None:
        print(f"  {engine.key}: no dockerd of ours is running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        print(f"  {engine.key}: dockerd {pid} did not stop in {STOP_WAIT_S:.0f} s; killing it")
        os.kill(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.1)
    engine.pidfile.unlink(missing_ok=True)
    print(f"  {engine.key}: stopped dockerd {pid}")


def down() -> int:
    with locked():
        stack = load_stack()
        started = set(stack.get("started", []))
        for engine in (ENGINE1, ENGINE2):
            remove_test_containers(engine)
        # An sshd running from our pidfile with our config was started here, whatever stack.json says.
        if SSHD_KEY in started or our_sshd() is not None:
            stop_sshd()
        # A dockerd running from our pidfile was started here, whatever stack.json says.
        if "engine2" in started or our_dockerd(ENGINE2) is not None:
            stop_engine(ENGINE2)
        if connect(ENGINE2.host, timeout=3) is None:
            if subprocess.run(["ip", "link", "show", BRIDGE2], capture_output=True).returncode == 0:
                run(["ip", "link", "delete", BRIDGE2])
                print(f"  deleted bridge {BRIDGE2}")
        else:
            print(f"  {BRIDGE2} kept: an engine not started here still answers on {ENGINE2.host}")
        if "engine1" in started or our_dockerd(ENGINE1) is not None:
            stop_engine(ENGINE1)
        elif connect(ENGINE1.host, timeout=3) is not None:
            print("  engine1: not started here, left running")
        else:
            print("  engine1: not running")
        STACK_JSON.unlink(missing_ok=True)
    print("stack down")
    return 0


def status() -> int:
    stack = load_stack()
    print(json.dumps(stack, indent=2) if stack else f"no {STACK_JSON.relative_to(REPO)}: run `make stack-up`")
    for engine in (ENGINE1, ENGINE2):
        client = connect(engine.host, timeout=3)
        if client is None:
            print(f"{engine.key} {engine.host}: does not answer")
            continue
        version = client.version().get("Version", "?")
        image = stack.get("image")
        has = f", {image} {'present' if image and has_image(client, image) else 'missing'}" if image else ""
        mine = " (started here)" if our_dockerd(engine) else ""
        print(f"{engine.key} {engine.host}: answers, Docker {version}{mine}{has}")
    host_2_tls, record = stack.get("docker_host_2_tls"), stack.get("tls_2")
    if host_2_tls and isinstance(record, dict):
        print(f"engine2 {host_2_tls}: {tls_status(host_2_tls, record)}")
    host_2_ssh, ssh_record = stack.get("docker_host_2_ssh"), stack.get("ssh_2")
    if host_2_ssh and isinstance(ssh_record, dict):
        print(f"engine2 {host_2_ssh}: {ssh_status(host_2_ssh, ssh_record)}")
    return 0


def tls_status(host: str, record: dict[str, Any]) -> str:
    try:
        with without_ca_bundle_env():
            client = connect(host, timeout=3, tls=tls_config(record))
            if client is None:
                return "does not answer over TLS" + (" (reading the client key needs root)" if os.geteuid() else "")
            return f"answers over mutual TLS, Docker {client.version().get('Version', '?')}"
    except docker.errors.DockerException as e:  # e.g. the certificate files are gone
        return f"unusable TLS settings: {e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    if args.command != "status" and os.geteuid() != 0:
        print("tests/stack.py must run as root (it starts dockerd and builds a root filesystem)", file=sys.stderr)
        return 2
    try:
        return {"up": up, "down": down, "status": status}[args.command]()
    except StackError as e:
        print(f"\nstack {args.command} failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
