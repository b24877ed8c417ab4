"""Tests for :mod:`dolab_services.culler.extensions`: how far a stop time moves, and the store of extended times."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dolab_services.culler.extensions import ExtensionStore, extend_offer, extended_stop_at, headroom_hours

from .support import NOW, T0

H = timedelta(hours=1)


@pytest.mark.parametrize(
    ("current", "hours", "limit", "expected"),
    [
        pytest.param(NOW + H, 2, 24, NOW + 3 * H, id="moves-later"),
        pytest.param(NOW - H, 2, 24, NOW + 2 * H, id="past-stop-counts-from-now"),
        pytest.param(NOW + 20 * H, 4, 24, NOW + 24 * H, id="up-to-the-limit"),
        pytest.param(NOW + 20 * H, 500, 0, NOW + 520 * H, id="no-limit"),
        pytest.param(
            NOW + 20 * H, 4.5, 24, "at most 24 hours from now (2030-01-02T12:00:00Z); that is 4 more", id="over"
        ),
        pytest.param(None, 1, 24, "no stop time to extend", id="no-stop-time"),
        pytest.param(NOW, 0, 24, "positive number of hours, not 0", id="zero"),
        pytest.param(NOW, "2", 24, "positive number of hours, not '2'", id="string"),
        pytest.param(NOW, True, 24, "positive number of hours", id="bool"),
        pytest.param(NOW, float("nan"), 24, "positive number of hours", id="nan"),
        pytest.param(NOW, 1e12, 0, "too far ahead", id="overflow"),
    ],
)
def test_extended_stop_at(current: datetime | None, hours: Any, limit: float, expected: datetime | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            extended_stop_at(current, hours, NOW, limit)
    else:
        assert extended_stop_at(current, hours, NOW, limit) == expected


def test_extension_store_keeps_one_run_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "extensions.json"
    store = ExtensionStore(path)
    store.set("alice", "", T0, NOW + H)
    store.set("bob", "gpu", T0, NOW + 2 * H)
    again = ExtensionStore(path)
    assert again.get("alice", "", T0) == NOW + H
    assert again.get("alice", "", "2030-01-01T11:00:00Z") is None, "a later start of the server starts afresh"
    again.prune([("alice", "", T0)])
    assert ExtensionStore(path).get("bob", "gpu", T0) is None
    assert ExtensionStore(path).get("alice", "", T0) == NOW + H


def test_extension_store_without_a_file_and_with_a_bad_one(tmp_path: Path) -> None:
    memory = ExtensionStore()
    memory.set("alice", "", T0, NOW)
    assert memory.get("alice", "", T0) == NOW
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert ExtensionStore(bad).get("alice", "", T0) is None


# ----- what one click extends by ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop_at", "max_run_hours", "expected"),
    [
        pytest.param(None, 24, None, id="no stop time"),
        pytest.param(NOW + timedelta(hours=1), 24, 23.0, id="within the limit"),
        pytest.param(NOW - timedelta(hours=1), 24, 24.0, id="past stop time counts from now"),
        pytest.param(NOW + timedelta(hours=30), 24, 0.0, id="beyond the limit"),
        pytest.param(NOW + timedelta(hours=1), 0, math.inf, id="no limit"),
    ],
)
def test_headroom_hours(stop_at: datetime | None, max_run_hours: float, expected: float | None) -> None:
    assert headroom_hours(stop_at, NOW, max_run_hours) == expected


@pytest.mark.parametrize(
    ("headroom", "expected"),
    [
        pytest.param(None, 0.0, id="no stop time"),
        pytest.param(0.0, 0.0, id="at the limit"),
        pytest.param(-1.0, 0.0, id="past the limit"),
        pytest.param(10.0, 2.0, id="the full click"),
        pytest.param(math.inf, 2.0, id="no limit"),
        pytest.param(1.6, 1.5, id="rounded down to a quarter"),
        pytest.param(0.2, 0.0, id="less than a quarter"),
    ],
)
def test_extend_offer(headroom: float | None, expected: float) -> None:
    assert extend_offer(headroom, 2) == expected
