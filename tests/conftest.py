"""What every test shares: the process umask is put back after each test.

Loading the shipped ``jupyterhub_config.py`` in the test process as root does what the hub does at start-up,
including a private umask (077, :func:`dolab_core.paths.protect_data_dir`); later tests must not inherit it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)
