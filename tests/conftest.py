"""What every test shares: the process umask is put back after each test; the waits' stretch on this machine
(tests/patience.py) is in pytest's header and stretches pytest-timeout's limit too.

Loading the shipped ``jupyterhub_config.py`` in the test process as root does what the hub does at start-up,
including a private umask (077, :func:`dolab_core.paths.protect_data_dir`); later tests must not inherit it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.patience import DESCRIPTION, patience


def pytest_report_header() -> str:
    """The wait limits' stretch on this machine, beside pytest's other settings."""
    return DESCRIPTION


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """pytest-timeout's limit from pyproject.toml, stretched like every wait (before pytest-timeout reads it); one
    given with --timeout or PYTEST_TIMEOUT is kept as it is."""
    if getattr(config.option, "timeout", "absent") is None and not os.environ.get("PYTEST_TIMEOUT"):
        ini = config.getini("timeout")
        if ini:
            config.option.timeout = patience(float(ini))


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)
