"""The monitor's view of the hub's servers (dolab_services.monitor.runs): what each holds and costs, and GPU prices."""

from __future__ import annotations

from typing import Any

import pytest

from dolab_services.monitor.runs import GpuPrices, server_runs


def hub_user(name: str, state: dict[str, Any], started: str = "2026-11-26T10:00:00Z", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "groups": ["g"],
        "servers": {"": {"started": started, "ready": True, "state": state, **extra}},
    }


@pytest.mark.parametrize(
    ("state", "gpus", "usd"),
    [
        ({"backend": "local", "slots": [{"uuid": "u0", "name": "NVIDIA A100 80GB"}]}, {"NVIDIA A100 80GB": 1}, 1.5),
        (
            {
                "backend": "docker",
                "slots": [{"uuid": "u0", "name": "NVIDIA A10"}, {"uuid": "u1", "name": "NVIDIA A10"}],
            },
            {"NVIDIA A10": 2},
            0.8,
        ),
        ({"backend": "local", "slots": []}, {}, 0.0),
        (
            {"backend": "runpod", "price_per_hour_usd": 2.5, "gpu_type": "RTX 4090", "gpu_count": 2},
            {"RTX 4090": 2},
            2.5,
        ),
        ({"backend": "runpod", "gpu_type": "RTX 4090"}, {"RTX 4090": 1}, 0.0),  # no price yet: 0
        (  # what the RunPod backend saves: its keys under backend_state
            {
                "backend": "runpod",
                "slots": [],
                "backend_state": {
                    "pod_id": "p1",
                    "gpu_type_id": "NVIDIA A100 80GB PCIe",
                    "gpu_count": 2,
                    "price_per_hour_usd": 3.58,
                },
            },
            {"NVIDIA A100 80GB PCIe": 2},
            3.58,
        ),
        ({"backend": "runpod", "price_per_hour_usd": "cheap"}, {}, 0.0),
        ({}, {}, 0.0),  # not a DO-LAB server (no state readable)
    ],
    ids=[
        "local-a100",
        "docker-2xa10",
        "cpu",
        "runpod",
        "runpod-no-price",
        "runpod-backend-state",
        "runpod-bad-price",
        "no-state",
    ],
)
def test_server_runs_from_hub_models(state: dict[str, Any], gpus: dict[str, int], usd: float) -> None:
    prices = GpuPrices.from_config({"A100": 1.5, "A10": 0.4})
    [run] = server_runs([hub_user("ana", state)], prices)
    assert dict(run.gpus) == gpus and run.usd_per_hour == pytest.approx(usd)
    assert run.groups == ("g",) and run.run == "2026-11-26T10:00:00Z"
    assert run.metered == (bool(gpus) or usd > 0)


def test_servers_without_a_start_time_are_skipped() -> None:
    assert server_runs([hub_user("ana", {}, started=None)], GpuPrices()) == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "price"),
    [("NVIDIA A100-SXM4-80GB", 2.0), ("NVIDIA A100 80GB PCIe", 2.0), ("NVIDIA A10", 0.5), ("Tesla T4", 0.0)],
)
def test_gpu_prices_match_whole_words(name: str, price: float) -> None:
    prices = GpuPrices.from_config({"A100": 2.0, "A10": 0.5, "A100 80GB PCIe": 2.0})
    assert prices.price(name) == price


def test_bad_gpu_prices_are_refused() -> None:
    with pytest.raises(ValueError, match="must be 0 or more USD per GPU-hour"):
        GpuPrices.from_config({"A100": -1})
