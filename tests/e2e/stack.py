"""The Docker test stack that `make stack-up` (tests/stack.py up) started, as tests see it.

Tests that need real Docker engines call ``docker_stack()``: it reads .dolab/stack/stack.json and skips the test
when the stack is not up, or fails it on CI (``CI=true``), where `make test` must have started it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
STACK_JSON = REPO / ".dolab" / "stack" / "stack.json"


@dataclass(frozen=True)
class DockerStack:
    """Two engines and the single-user test image (see tests/stack.py)."""

    docker_host: str  # engine 1, e.g. unix:///var/run/docker.sock
    docker_host_2: str  # engine 2, a second "host" with its own bridge
    bridge_ip: str  # engine 1's docker0 address: where its containers reach the hub
    bridge_ip_2: str  # engine 2's bridge address
    image: str  # dolab-singleuser-test:<recipe hash>; also tagged :latest and :alt on both engines
    images: tuple[str, ...] = ()
    started: tuple[str, ...] = ()
    # Engine 2 over TCP with mutual TLS, as a remote GPU machine is reached: tcp://127.0.0.1:<port>, and the keyword
    # arguments of docker.tls.TLSConfig for it ({"ca_cert": path, "client_cert": (cert, key), "verify": True}).
    # Both empty with a stack.json from before the TLS listener. Note: requests lets REQUESTS_CA_BUNDLE or
    # CURL_CA_BUNDLE, where set, override TLSConfig's ca_cert (docker/docker-py#2433).
    docker_host_2_tls: str = ""
    tls_2: dict[str, Any] = field(default_factory=dict)
    # Engine 2 over ssh://root@127.0.0.1:<port>: a private sshd that lets in only the stack's client key, and only for
    # `docker system dial-stdio` to engine 2; and the `ssh` settings of a docker_hosts entry for it
    # ({"identity_file": path, "known_hosts": path with the sshd's host key}). Both empty with an older stack.json.
    docker_host_2_ssh: str = ""
    ssh_2: dict[str, Any] = field(default_factory=dict)


def frozen(value: Any) -> Any:
    """JSON lists as tuples, also inside objects (tls_2's client_cert)."""
    if isinstance(value, list):
        return tuple(frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: frozen(v) for k, v in value.items()}
    return value


def docker_stack() -> DockerStack:
    """The running stack; skips (or, on CI, fails) the calling test when it is missing."""
    try:
        data = json.loads(STACK_JSON.read_text())
        known = {f.name for f in fields(DockerStack)}
        values: dict[str, Any] = {k: frozen(v) for k, v in data.items() if k in known}
        return DockerStack(**values)
    except (OSError, ValueError, TypeError) as e:
        problem = f"The Docker test stack is not up ({STACK_JSON} is missing or unreadable: {e})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{problem}; on CI `make test` must start it with `make stack-up`.", pytrace=False)
    pytest.skip(f"{problem}: run `make stack-up`.")
