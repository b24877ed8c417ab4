"""The Docker test stack that `make stack-up` (tests/stack.py up) started, as tests see it.

Tests that need real Docker engines call ``docker_stack()``: it reads .dolab/stack/stack.json and skips the test
when the stack is not up, or fails it on CI (``CI=true``), where `make test` must have started it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
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


def docker_stack() -> DockerStack:
    """The running stack; skips (or, on CI, fails) the calling test when it is missing."""
    try:
        data = json.loads(STACK_JSON.read_text())
        known = {f.name for f in fields(DockerStack)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return DockerStack(**values)
    except (OSError, ValueError, TypeError) as e:
        problem = f"The Docker test stack is not up ({STACK_JSON} is missing or unreadable: {e})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{problem}; on CI `make test` must start it with `make stack-up`.", pytrace=False)
    pytest.skip(f"{problem}: run `make stack-up`.")
