"""Fixtures of the culler's unit tests: a hub double, single-user server doubles, and the Lab on both."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..hub_double import HubDouble, serve_hub_double
from .support import Lab


@pytest.fixture
def hub() -> Iterator[HubDouble]:
    with serve_hub_double() as double:
        yield double


@pytest.fixture
def servers() -> Iterator[HubDouble]:
    """Single-user servers' API: ``/user/NAME/api/kernels``."""
    with serve_hub_double() as double:
        yield double


@pytest.fixture
def lab(hub: HubDouble, servers: HubDouble) -> Lab:
    return Lab(hub, servers)
