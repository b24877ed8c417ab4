"""The ``dolab-monitor`` service as a program (:class:`MonitorApp`): settings and their checks, the tick loop, the
page, API and metrics (``python -m dolab_services.monitor``).

Every ``--interval`` seconds a tick (:mod:`.sampler`) lists the running servers, reads the GPUs (:mod:`.telemetry`),
books usage in the ledger (:mod:`.ledger`), checks quotas (:mod:`.quotas`, :mod:`.enforcer`: a warning at
``--warn-percent``, a stop through the shared stop path at 100%) and updates the metrics (:mod:`.metrics`). The
page and API are in :mod:`.web`; the hub's spawn-time check in :mod:`.quotacheck`; what the shipped config adds
in :mod:`.registration`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, Float, Integer, List, Unicode, default

from dolab_core.plans import plans_from_env

from ..app import ServiceApp
from ..hubclient import HubAPIError, HubClient
from ..stop import StopPath, load_hooks
from .enforcer import QuotaEnforcer
from .ledger import AsyncLedger, UsageLedger
from .metrics import MonitorMetrics
from .quotas import QuotaConfig
from .registration import SERVICE_NAME, load_quotas
from .runs import GpuPrices
from .sampler import Monitor
from .telemetry import TelemetrySource, load_source

__all__ = ["MonitorApp", "main"]


def _env_json(name: str) -> Any:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{name} is not valid JSON ({e})") from None


class MonitorApp(ServiceApp):
    """The ``dolab-monitor`` service: ticks every ``interval_seconds`` and serves its page, API and metrics."""

    name = SERVICE_NAME
    description = "GPU and cost telemetry, usage ledger, quotas, Prometheus metrics and a dashboard page."

    interval_seconds = Float(15, config=True, help="Seconds between two sampling ticks.")
    telemetry = Unicode(
        "nvml", config=True, help='Where GPU readings come from: "nvml", "file:/abs/path.json" or "module.path:Class".'
    )
    telemetry_timeout_seconds = Float(10, config=True, help="How long one telemetry read may take (seconds).")
    db_url = Unicode(
        config=True,
        help="""The ledger's SQLAlchemy URL: sqlite:///path or postgresql://user:password@host/db (psycopg;
        pip install 'dolab[postgres]'). Default: $DOLAB_MONITOR_DB_URL, else monitor.sqlite in the data directory.""",
    )
    db_timeout_seconds = Float(30, config=True, help="How long one ledger query or booking may take (seconds).")
    quotas_file = Unicode(
        "",
        config=True,
        help="""A JSON file with the quotas ({"users": {...}, "groups": {...}, "default": Q}); read again when it
        changes. Empty: $DOLAB_MONITOR_QUOTAS (JSON), else no quotas.""",
    )
    gpu_prices = Dict(
        config=True,
        help='USD per GPU-hour of local and Docker GPUs by type, e.g. {"A100": 1.5}. '
        "Default: $DOLAB_MONITOR_GPU_PRICES, else none (0).",
    )
    warn_percent = Float(90, config=True, help="Warn a user at this percentage of a quota limit.")
    enforce = Bool(True, config=True, help="Stop metered servers at 100% of a quota (False: warn and log only).")
    per_user_metrics = Bool(False, config=True, help="Export per-user usage series (unbounded with many users).")
    history_points = Integer(240, config=True, help="GPU readings kept per server for the plots (in memory).")
    pre_stop_hooks = List(
        Unicode(),
        config=True,
        help="Async callables module.path:name called as hook(user, server, reason) before a quota stop, in order.",
    )
    hook_timeout_seconds = Float(600, config=True, help="How long one pre-stop hook may take (seconds).")
    once = Bool(False, config=True, help="Tick once and exit, without the page (1 if the hub was unreadable).")

    aliases = {
        "interval": "MonitorApp.interval_seconds",
        "telemetry": "MonitorApp.telemetry",
        "telemetry-timeout": "MonitorApp.telemetry_timeout_seconds",
        "db-url": "MonitorApp.db_url",
        "quotas-file": "MonitorApp.quotas_file",
        "warn-percent": "MonitorApp.warn_percent",
        "history-points": "MonitorApp.history_points",
        "pre-stop-hook": "MonitorApp.pre_stop_hooks",
        "hook-timeout": "MonitorApp.hook_timeout_seconds",
        "log-level": "Application.log_level",
    }
    flags = {
        "per-user-metrics": ({"MonitorApp": {"per_user_metrics": True}}, "Export per-user usage series."),
        "no-enforce": ({"MonitorApp": {"enforce": False}}, "Warn and log, but stop no server for its quota."),
        "once": ({"MonitorApp": {"once": True}}, "Tick once and exit."),
    }

    @default("db_url")
    def _default_db_url(self) -> str:
        from dolab_core.paths import default_data_dir

        if os.environ.get("DOLAB_MONITOR_DB_URL"):
            return os.environ["DOLAB_MONITOR_DB_URL"]
        return f"sqlite:///{Path(default_data_dir()) / 'monitor.sqlite'}"

    @default("gpu_prices")
    def _default_gpu_prices(self) -> dict[str, Any]:
        try:
            return _env_json("DOLAB_MONITOR_GPU_PRICES") or {}
        except ValueError:
            return {}

    def _quotas(self) -> QuotaConfig:
        if self.quotas_file:
            quotas = load_quotas(self.quotas_file)
        else:
            quotas = QuotaConfig.from_config(_env_json("DOLAB_MONITOR_QUOTAS"))
        return replace(quotas, plans=plans_from_env())  # the plans' quotas: the same plans the spawner reads

    def _check(self) -> tuple[QuotaConfig, GpuPrices]:
        for name, value in (
            ("--interval", self.interval_seconds),
            ("--telemetry-timeout", self.telemetry_timeout_seconds),
            ("--hook-timeout", self.hook_timeout_seconds),
        ):
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive number of seconds, not {value:g}")
        if not 0 < self.warn_percent <= 100:
            raise ValueError(f"--warn-percent must be between 0 and 100, not {self.warn_percent:g}")
        if self.history_points < 2:
            raise ValueError(f"--history-points must be at least 2, not {self.history_points}")
        return self._quotas(), GpuPrices.from_config(self.gpu_prices)

    def start(self) -> None:
        """Check the settings, then tick and serve until stopped (or tick once)."""
        try:
            quotas, prices = self._check()
            hooks = load_hooks(self.pre_stop_hooks)
            source = load_source(self.telemetry)
            hub = HubClient()
        except ValueError as e:
            self.fail(str(e))
        self.share_log()
        try:
            ledger = UsageLedger(self.db_url)
        except Exception as e:  # a bad URL, a database that does not answer, a missing driver
            self.fail(f"cannot open the ledger database ({type(e).__name__}: {e})")
        self.log.info(
            "Sampling every %g s; GPU readings from %s; ledger in %s; %s; warning at %g%%%s",
            self.interval_seconds,
            self.telemetry,
            ledger.engine.dialect.name,
            "no quotas" if quotas.empty else "quotas from " + (self.quotas_file or "$DOLAB_MONITOR_QUOTAS"),
            self.warn_percent,
            "" if self.enforce else " (no stops)",
        )
        self.run_until_stopped(lambda: self._run(quotas, prices, hub, hooks, source, ledger))

    def _reload_quotas(self, monitor: Monitor, seen: list[float]) -> None:
        if not self.quotas_file:
            return
        try:
            mtime = os.stat(self.quotas_file).st_mtime
        except OSError:
            return
        if seen and mtime == seen[0]:
            return
        seen[:] = [mtime]
        try:
            monitor.quotas = replace(load_quotas(self.quotas_file), plans=monitor.quotas.plans)
        except ValueError as e:
            self.log.error("%s: keeping the quotas read before", e)
        else:
            self.log.info("Quotas read from %s", self.quotas_file)

    async def _run(
        self,
        quotas: QuotaConfig,
        prices: GpuPrices,
        hub: HubClient,
        hooks: Sequence[Any],
        source: TelemetrySource,
        ledger: UsageLedger,
    ) -> int:
        from .web import make_app  # the page needs jupyterhub's OAuth helpers; a one-off tick does not

        metrics = MonitorMetrics(per_user=self.per_user_metrics)
        stop_path = StopPath(
            hub, hooks, registry=metrics.registry, hook_timeout_seconds=self.hook_timeout_seconds, log=self.log
        )
        monitor = Monitor(
            hub,
            AsyncLedger(ledger, timeout_seconds=self.db_timeout_seconds),
            source,
            QuotaEnforcer(stop_path, warn_fraction=self.warn_percent / 100, enforce=self.enforce, log=self.log),
            quotas=quotas,
            prices=prices,
            metrics=metrics,
            telemetry_timeout_seconds=self.telemetry_timeout_seconds,
            history_points=self.history_points,
            log=self.log,
        )
        server = None
        quotas_seen: list[float] = []
        if self.quotas_file:
            quotas_seen.append(os.stat(self.quotas_file).st_mtime)
        try:
            if self.once:
                try:
                    await monitor.tick()
                except HubAPIError as e:
                    self.log.error("Cannot list the hub's servers: %s", e)
                    return 1
                await monitor.enforcer.drain()
                return 0
            token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
            server = self.serve_page(
                lambda prefix: make_app(monitor, prefix, service_token=token, log=self.log),
                SERVICE_NAME,
                serves="page, API and metrics",
                goes_on="accounting and quotas",
                port_variable="DOLAB_MONITOR_PORT",
            )

            async def tick() -> None:
                self._reload_quotas(monitor, quotas_seen)
                await monitor.tick()

            await self.repeat(tick, self.interval_seconds, "tick")
            return 0
        finally:
            if server is not None:
                server.stop()
            hub.close()
            await source.close()
            monitor.ledger.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dolab_services.monitor``."""
    MonitorApp.launch_instance(list(argv) if argv is not None else None)
