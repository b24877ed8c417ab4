"""The monitor's Prometheus metrics, at ``/services/dolab-monitor/metrics`` (no login: nothing secret).

Every name starts with ``dolab_``; labels are bounded by the hardware and the configuration (GPU host, index and
type, backend, quota metric and period). Per-user series (``dolab_user_*{user}``) exist only when the
``--per-user-metrics`` flag is set: with many users they would make the series count unbounded.

- ``dolab_gpu_utilization_percent``, ``dolab_gpu_memory_used_bytes``, ``dolab_gpu_memory_total_bytes``,
  ``dolab_gpu_temperature_celsius``, ``dolab_gpu_power_watts``, ``dolab_gpu_held`` (1 when a server holds it),
  ``dolab_gpu_processes`` ``{host, index, gpu_type}``: the last telemetry reading of each GPU;
- ``dolab_servers_running{backend}``, ``dolab_gpus_in_use{backend, gpu_type}``, ``dolab_spend_usd_per_hour{backend}``;
- ``dolab_gpu_seconds_total{backend, gpu_type}``, ``dolab_cost_usd_total{backend}``: booked by this process;
- ``dolab_quota_users{state}`` (``warned``, ``exceeded``): users near or past a limit;
- ``dolab_server_stops_total{reason}`` / ``dolab_server_stop_blocked_total{reason}`` (the shared stop path; the
  monitor's stops have reason ``quota``);
- ``dolab_monitor_tick_seconds`` / ``dolab_monitor_tick_cpu_seconds`` (the last tick),
  ``dolab_monitor_ticks_total{result}``; ``process_*`` (the service's own memory and CPU);
- with ``--per-user-metrics``: ``dolab_user_gpu_hours{user, period}``, ``dolab_user_cost_usd{user, period}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

from .ledger import Booking
from .periods import Period
from .quotas import Metric
from .runs import ServerRun
from .telemetry import GpuReading

__all__ = ["MonitorMetrics"]

_GPU = ["host", "index", "gpu_type"]


class MonitorMetrics:
    """The monitor's metrics in their own registry (``registry``), updated after every tick."""

    def __init__(self, registry: CollectorRegistry | None = None, *, per_user: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.per_user = per_user
        r = self.registry
        self.utilization = Gauge("dolab_gpu_utilization_percent", "GPU utilisation (percent).", _GPU, registry=r)
        self.memory_used = Gauge("dolab_gpu_memory_used_bytes", "GPU memory in use.", _GPU, registry=r)
        self.memory_total = Gauge("dolab_gpu_memory_total_bytes", "GPU memory.", _GPU, registry=r)
        self.temperature = Gauge("dolab_gpu_temperature_celsius", "GPU temperature.", _GPU, registry=r)
        self.power = Gauge("dolab_gpu_power_watts", "GPU power draw.", _GPU, registry=r)
        self.held = Gauge("dolab_gpu_held", "1 when a server holds the GPU's slot.", _GPU, registry=r)
        self.processes = Gauge("dolab_gpu_processes", "Processes using the GPU.", _GPU, registry=r)
        self.servers = Gauge("dolab_servers_running", "Servers running or starting.", ["backend"], registry=r)
        self.gpus_in_use = Gauge("dolab_gpus_in_use", "GPUs held by servers.", ["backend", "gpu_type"], registry=r)
        self.spend_rate = Gauge(
            "dolab_spend_usd_per_hour", "What the running servers cost per hour (USD).", ["backend"], registry=r
        )
        self.gpu_seconds = Counter(
            "dolab_gpu_seconds", "GPU-seconds booked in the ledger.", ["backend", "gpu_type"], registry=r
        )
        self.cost = Counter("dolab_cost_usd", "Cost booked in the ledger (USD).", ["backend"], registry=r)
        self.quota_users = Gauge("dolab_quota_users", "Users near or past a quota limit.", ["state"], registry=r)
        self.tick_seconds = Gauge("dolab_monitor_tick_seconds", "Wall time of the last tick.", registry=r)
        self.tick_cpu_seconds = Gauge("dolab_monitor_tick_cpu_seconds", "CPU time of the last tick.", registry=r)
        self.ticks = Counter("dolab_monitor_ticks", "Sampling ticks, by result.", ["result"], registry=r)
        for result in ("ok", "failed"):
            self.ticks.labels(result=result)
        for state in ("warned", "exceeded"):
            self.quota_users.labels(state=state).set(0)
        self.user_gpu_hours = self.user_cost = None
        if per_user:
            self.user_gpu_hours = Gauge(
                "dolab_user_gpu_hours", "A user's GPU-hours this period.", ["user", "period"], registry=r
            )
            self.user_cost = Gauge("dolab_user_cost_usd", "A user's spend this period.", ["user", "period"], registry=r)
        ProcessCollector(registry=r)

    def observe_gpus(self, readings: Sequence[GpuReading], held: Iterable[str]) -> None:
        """The last reading of every GPU (series of GPUs gone from the readings are removed)."""
        held = set(held)
        gauges = (self.utilization, self.memory_used, self.memory_total, self.temperature, self.power)
        for gauge in (*gauges, self.held, self.processes):
            gauge.clear()
        for r in readings:
            labels = {"host": r.host, "index": "" if r.index is None else str(r.index), "gpu_type": r.name}
            for gauge, value in zip(
                gauges,
                (
                    r.utilization_percent,
                    None if r.memory_used_gb is None else r.memory_used_gb * 2**30,
                    None if r.memory_total_gb is None else r.memory_total_gb * 2**30,
                    r.temperature_c,
                    r.power_w,
                ),
                strict=True,
            ):
                if value is not None:
                    gauge.labels(**labels).set(value)
            self.held.labels(**labels).set(1 if r.uuid in held else 0)
            self.processes.labels(**labels).set(len(r.processes))

    def observe_runs(self, runs: Sequence[ServerRun]) -> None:
        """Servers, GPUs in use and the spend rate, by backend."""
        for gauge in (self.servers, self.gpus_in_use, self.spend_rate):
            gauge.clear()
        for run in runs:
            backend = run.backend or "unknown"
            self.servers.labels(backend=backend).inc()
            self.spend_rate.labels(backend=backend).inc(run.usd_per_hour)
            for gpu_type, count in run.gpus.items():
                self.gpus_in_use.labels(backend=backend, gpu_type=gpu_type).inc(count)

    def observe_bookings(self, bookings: Iterable[Booking]) -> None:
        """What a tick booked."""
        for b in bookings:
            backend = b.backend or "unknown"
            for gpu_type, seconds in b.gpu_seconds.items():
                if seconds > 0:
                    self.gpu_seconds.labels(backend=backend, gpu_type=gpu_type).inc(seconds)
            if b.cost_usd > 0:
                self.cost.labels(backend=backend).inc(b.cost_usd)

    def observe_quotas(
        self, warned: int, exceeded: int, usage: Mapping[str, Mapping[Period, Mapping[Metric, float]]]
    ) -> None:
        """Users near and past a limit; per-user usage when enabled."""
        self.quota_users.labels(state="warned").set(warned)
        self.quota_users.labels(state="exceeded").set(exceeded)
        if self.user_gpu_hours is not None and self.user_cost is not None:
            self.user_gpu_hours.clear()
            self.user_cost.clear()
            for user, periods in usage.items():
                for period, values in periods.items():
                    self.user_gpu_hours.labels(user=user, period=period).set(values.get("gpu_hours", 0.0))
                    self.user_cost.labels(user=user, period=period).set(values.get("usd", 0.0))
