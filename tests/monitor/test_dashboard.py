"""The Grafana dashboard in examples/grafana/dolab.json asks only for series the monitor exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dolab_services.hubclient import HubClient
from dolab_services.monitor.ledger import Booking
from dolab_services.monitor.metrics import MonitorMetrics
from dolab_services.monitor.runs import GpuPrices, server_runs
from dolab_services.monitor.telemetry import GpuReading
from dolab_services.stop import StopPath

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "dolab.json"


def exported_names() -> set[str]:
    metrics = MonitorMetrics()
    StopPath(HubClient("http://127.0.0.1:1/hub/api", "t"), registry=metrics.registry)
    user = {
        "name": "a",
        "servers": {"": {"started": "2026-11-26T10:00:00Z", "state": {"backend": "runpod", "gpu_type": "RTX 4090"}}},
    }
    metrics.observe_runs(server_runs([user], GpuPrices()))
    metrics.observe_gpus(
        [
            GpuReading(
                "GPU-0",
                index=0,
                name="A100",
                utilization_percent=1,
                memory_used_gb=1,
                memory_total_gb=2,
                temperature_c=3,
                power_w=4,
            )
        ],
        ["GPU-0"],
    )
    metrics.observe_bookings([Booking("a", "", "local", 1, {"A100": 1}, 1.0)])
    text = generate_latest(metrics.registry).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_series_the_dashboard_queries_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v.get("query", "") for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {name for expr in exprs for name in re.findall(r"\bdolab_[a-z_]+", expr)}
    assert used, "the dashboard queries nothing"
    missing = used - exported_names()
    assert not missing, f"the dashboard asks for series the monitor does not export: {sorted(missing)}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
