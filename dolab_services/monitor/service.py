"""dolab-monitor: GPU and cost telemetry, the usage ledger, quotas, Prometheus metrics and a dashboard page.

``python -m dolab_services.monitor`` runs as a hub-managed service (the shipped config registers it, see
:func:`monitor_service`). Every ``--interval`` seconds a tick (:mod:`.sampler`) lists the running servers, reads
the GPUs (:mod:`.telemetry`), books usage in the ledger (:mod:`.ledger`), checks quotas (:mod:`.quotas`,
:mod:`.enforcer`: a warning at ``--warn-percent``, a stop through the shared stop path at 100%) and updates the
metrics (:mod:`.metrics`). The page and API are in :mod:`.web`; the hub's spawn-time check in :mod:`.quotacheck`.

Scopes (role ``dolab-monitor``, :data:`MONITOR_SCOPES`): ``list:users``, ``read:users:name`` and
``read:users:groups`` (who, and their groups for group quotas), ``read:servers`` and ``admin:server_state`` (the
servers and what their state says they hold and cost), ``delete:servers`` (quota stops). Users get
``access:services!service=dolab-monitor`` through ``c.JupyterHub.extra_user_scopes`` to open the page.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, Float, Integer, List, Unicode, default
from traitlets.config import Config

from dolab_core.hubconfig import config_value, env_float
from dolab_core.plans import parse_plans, plans_from_env, service_environment

from ..app import ServiceApp
from ..hubclient import HubAPIError, HubClient
from ..scopes import READ_USAGE
from ..stop import StopPath, load_hooks
from .enforcer import QuotaEnforcer
from .ledger import AsyncLedger, UsageLedger
from .metrics import MonitorMetrics
from .quotas import QuotaConfig
from .runs import GpuPrices
from .sampler import Monitor
from .telemetry import TelemetrySource, load_source

__all__ = [
    "MONITOR_SCOPES",
    "SERVICE_NAME",
    "USER_SCOPE",
    "MonitorApp",
    "MonitorRegistration",
    "load_quotas",
    "main",
    "monitor_service",
]

SERVICE_NAME = "dolab-monitor"
#: What the monitor's token needs, and what the shipped config's ``dolab-monitor`` role grants.
MONITOR_SCOPES = (
    "list:users",
    "read:users:name",
    "read:users:groups",
    "read:servers",
    "admin:server_state",
    "delete:servers",
)
USER_SCOPE = f"access:services!service={SERVICE_NAME}"
DEFAULT_PORT = 10102


def load_quotas(path: str) -> QuotaConfig:
    """The quotas in a JSON file; ValueError with a sentence."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"Cannot read the quotas file {path} ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"The quotas file {path} is not valid JSON ({e})") from None
    return QuotaConfig.from_config(data)


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
            print(f"{SERVICE_NAME}: {e}", file=sys.stderr)
            self.exit(2)
        package_log = logging.getLogger("dolab_services")
        package_log.setLevel(self.log.level)
        for handler in self.log.handlers:
            package_log.addHandler(handler)
        try:
            ledger = UsageLedger(self.db_url)
        except Exception as e:  # a bad URL, a database that does not answer, a missing driver
            print(f"{SERVICE_NAME}: cannot open the ledger database ({type(e).__name__}: {e})", file=sys.stderr)
            self.exit(2)
        self.log.info(
            "Sampling every %g s; GPU readings from %s; ledger in %s; %s; warning at %g%%%s",
            self.interval_seconds,
            self.telemetry,
            ledger.engine.dialect.name,
            "no quotas" if quotas.empty else "quotas from " + (self.quotas_file or "$DOLAB_MONITOR_QUOTAS"),
            self.warn_percent,
            "" if self.enforce else " (no stops)",
        )
        self.exit(asyncio.run(self._run(quotas, prices, hub, hooks, source, ledger)))

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


# ----- registration in jupyterhub_config.py ----------------------------------------------------------------


@dataclass(frozen=True)
class MonitorRegistration:
    """What the shipped config adds: the service, its role, the user scopes, and the spawner's quota check."""

    service: dict[str, Any]
    role: dict[str, Any]
    extra_user_scopes: set[str]
    #: A :class:`~.quotacheck.MonitorQuotaCheck` when quotas are configured, else None.
    quota_check: Any


def monitor_service(
    config: Config, env: Mapping[str, str], python: str = sys.executable, data_dir: str | os.PathLike[str] = ""
) -> MonitorRegistration | None:
    """The hub-managed ``dolab-monitor`` service, its role, ``extra_user_scopes`` and the spawn-time quota check.

    From ``DOLAB_MONITOR_PORT`` (default 10102), ``DOLAB_MONITOR_INTERVAL`` (15 s), ``DOLAB_MONITOR_TELEMETRY``,
    ``DOLAB_MONITOR_DB_URL`` (default: SQLite in the data directory), ``DOLAB_MONITOR_QUOTAS`` (JSON) or
    ``DOLAB_MONITOR_QUOTAS_FILE`` (checked now; the service reads the file again when it changes),
    ``DOLAB_MONITOR_GPU_PRICES`` (JSON), ``DOLAB_MONITOR_WARN_PERCENT`` (90), ``DOLAB_MONITOR_PER_USER_METRICS``
    and ``DOLAB_MONITOR_FAIL_CLOSED`` (``1``: refuse GPU spawns while the monitor cannot be asked). The service's
    token is kept in ``<data dir>/monitor-token``: the hub's quota check sends it. None when the config already
    has a service of that name. Raises ValueError with a sentence for bad settings.
    """
    from dolab_core.hubconfig import ConfigEnvError, ensure_secret, env_json

    from .quotacheck import MonitorQuotaCheck

    services = config_value(config, "JupyterHub", "services", [])
    if any(isinstance(s, Mapping) and s.get("name") == SERVICE_NAME for s in services):
        return None
    interval = env_float(env, "DOLAB_MONITOR_INTERVAL", 15)
    if interval <= 0:
        raise ValueError(f"DOLAB_MONITOR_INTERVAL must be a positive number of seconds, not {interval:g}")
    port = env_float(env, "DOLAB_MONITOR_PORT", DEFAULT_PORT)
    if port != int(port) or not 0 < port < 65536:
        raise ValueError(f"DOLAB_MONITOR_PORT must be a TCP port number, not {env.get('DOLAB_MONITOR_PORT')!r}")
    warn = env_float(env, "DOLAB_MONITOR_WARN_PERCENT", 90)
    if not 0 < warn <= 100:
        raise ValueError(f"DOLAB_MONITOR_WARN_PERCENT must be between 0 and 100, not {warn:g}")
    try:
        prices = env_json(env, "DOLAB_MONITOR_GPU_PRICES")
        GpuPrices.from_config(prices)
    except ConfigEnvError as e:
        raise ValueError(str(e)) from None
    command = [python, "-m", "dolab_services.monitor", "--interval", f"{interval:g}", "--warn-percent", f"{warn:g}"]
    environment: dict[str, str] = {}
    if prices:
        environment["DOLAB_MONITOR_GPU_PRICES"] = json.dumps(prices)
    quotas_file = env.get("DOLAB_MONITOR_QUOTAS_FILE", "").strip()
    quotas_text = env.get("DOLAB_MONITOR_QUOTAS", "").strip()
    if quotas_text:
        try:
            QuotaConfig.from_config(json.loads(quotas_text))
        except ValueError as e:
            raise ValueError(f"DOLAB_MONITOR_QUOTAS: {e}") from None
        environment["DOLAB_MONITOR_QUOTAS"] = quotas_text
    elif quotas_file:
        load_quotas(quotas_file)
        command += ["--quotas-file", str(Path(quotas_file).resolve())]
    telemetry = env.get("DOLAB_MONITOR_TELEMETRY", "").strip()
    if telemetry:
        command += ["--telemetry", telemetry]
    db_url = env.get("DOLAB_MONITOR_DB_URL", "").strip()
    if db_url:
        environment["DOLAB_MONITOR_DB_URL"] = db_url  # in the environment: a password must not show in `ps`
    elif data_dir:
        command += ["--db-url", f"sqlite:///{Path(data_dir) / 'monitor.sqlite'}"]
    if env.get("DOLAB_MONITOR_PER_USER_METRICS", "") in ("1", "true", "yes"):
        command.append("--per-user-metrics")
    plans = config_value(config, "DoLabSpawner", "plans", None)
    environment.update(service_environment(plans))
    plan_quotas = not QuotaConfig(plans=parse_plans(plans)).empty
    token = ensure_secret(Path(data_dir) / "monitor-token", length=40)[0] if data_dir else ""
    url = f"http://127.0.0.1:{int(port)}"
    service: dict[str, Any] = {
        "name": SERVICE_NAME,
        "command": command,
        "url": url,
        "oauth_no_confirm": True,
        # What the monitor checks for other users' usage: a browser's token carries it when its user has it.
        "oauth_client_allowed_scopes": [READ_USAGE],
        "environment": environment,
        "info": {"description": "GPU use, spend and quotas"},
    }
    if token:
        service["api_token"] = token
    role = {
        "name": SERVICE_NAME,
        "description": "GPU and cost telemetry, usage ledger and quota stops (dolab-monitor)",
        "scopes": list(MONITOR_SCOPES),
        "services": [SERVICE_NAME],
    }
    scopes = set(config_value(config, "JupyterHub", "extra_user_scopes", set()) or ()) | {USER_SCOPE}
    quota_check = None
    if (quotas_text or quotas_file or plan_quotas) and token:
        quota_check = MonitorQuotaCheck(
            f"{url}/services/{SERVICE_NAME}/",
            token,
            fail_closed=env.get("DOLAB_MONITOR_FAIL_CLOSED", "") in ("1", "true", "yes"),
        )
    return MonitorRegistration(service, role, scopes, quota_check)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dolab_services.monitor``."""
    app = MonitorApp()
    app.initialize(list(argv) if argv is not None else None)
    app.start()
