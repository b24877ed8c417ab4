"""The RunPod emulator as session fixtures, each started once on a free loopback port: for the emulator's own tests
here, and imported by the conftest.py of the other folders whose tests need it (tests/e2e/runpod, tests/spawner,
tests/core/engines).

``emulator`` runs pods as real containers on the test stack's engine 1 (`.venv/bin/python tests/stack.py up`);
``record_emulator`` keeps pods as records only, for the adapter's unit tests that need no engine.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import docker
import pytest

from tests.e2e.hub import free_port
from tests.e2e.stack import docker_stack
from tests.runpod_emulator.client import EmulatorProcess
from tests.runpod_emulator.server import LABEL


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """The emulator on engine 1; every container it ran is removed at the end, whatever happened."""
    stack = docker_stack()
    instance = f"dolab-test-{secrets.token_hex(4)}"
    log = tmp_path_factory.mktemp("runpod-emulator") / "emulator.log"
    em = EmulatorProcess(free_port(), secrets.token_hex(16), log, docker_host=stack.docker_host, instance=instance)
    try:
        yield em
    finally:
        em.stop()
        client = docker.DockerClient(base_url=stack.docker_host, timeout=60)
        for container in client.containers.list(all=True, filters={"label": f"{LABEL}={instance}"}):
            container.remove(force=True)


@pytest.fixture(scope="session")
def record_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """The emulator without an engine: pods get a made-up runtime and run nothing."""
    log = tmp_path_factory.mktemp("runpod-emulator-records") / "emulator.log"
    em = EmulatorProcess(free_port(), secrets.token_hex(16), log, docker_host=None, instance="dolab-records")
    try:
        yield em
    finally:
        em.stop()


@pytest.fixture
def clean_emulator(emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The session emulator with no faults and an empty request log."""
    emulator.reset()
    yield emulator
    emulator.reset()
