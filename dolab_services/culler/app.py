"""The ``dolab-culler`` service as a program: settings and their checks, the sweep loop, the page (:class:`Culler`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from traitlets import Bool, Float, Integer, List, Unicode, default

from dolab_core.hubconfig import env_float
from dolab_core.plans import plans_from_env

from ..app import ServiceApp
from ..hubclient import HubAPIError, HubClient
from ..servertokens import ServerTokens, revoke_quietly
from ..stop import StopPath, load_hooks
from .extensions import ExtensionStore
from .policy import CullPolicy
from .registration import SERVICE_NAME, load_policy
from .sweeper import Sweeper
from .telemetry import TelemetrySource, load_telemetry

__all__ = ["Culler", "main"]


class Culler(ServiceApp):
    """The ``dolab-culler`` service: sweeps every ``interval_seconds`` and serves its page and API."""

    name = SERVICE_NAME
    description = "Keep running work alive; warn, then stop idle or expired servers; let users extend."

    interval_seconds = Float(60, config=True, help="Seconds between two sweeps.")
    concurrency = Integer(10, config=True, help="At most this many servers have their kernels read at once.")
    policy_file = Unicode(
        "",
        config=True,
        help="""A JSON file with the policy (``CullPolicy.from_config``: rules with idle_hours and max_age_hours
        per profile, backend or GPU, warn_before_minutes, gpu_busy_percent, exempt_users, exempt_groups).
        Empty: the built-in defaults (CPU 24 h idle, local GPU 1 h, RunPod 15 min, 10 min warning).""",
    )
    telemetry = Unicode(
        "nvml",
        config=True,
        help='Where GPU use comes from: "nvml", "file:/abs/path.json" or "module.path:Class".',
    )
    max_run_hours = Float(
        config=True,
        help="The latest stop time users may extend to, in hours from now (0: no limit). "
        "Default: $DOLAB_MAX_RUN_HOURS, else 168.",
    )
    pre_stop_hooks = List(
        Unicode(),
        config=True,
        help="Async callables ``module.path:name`` called as hook(user, server, reason) before every stop, in "
        "order; one that raises blocks that stop until the next sweep. Repeat the flag for several.",
    )
    hook_timeout_seconds = Float(600, config=True, help="How long one pre-stop hook may take (seconds).")
    kernel_timeout_seconds = Float(10, config=True, help="How long reading a server's kernels may take (seconds).")
    extensions_file = Unicode(
        "", config=True, help="A JSON file keeping the stop times users extended to (empty: in memory only)."
    )
    extend_hours = Float(2, config=True, help="What the page's one-click button extends by (hours).")
    dry_run = Bool(False, config=True, help="Decide and log, but stop nothing and record no activity.")
    once = Bool(False, config=True, help="Sweep once and exit, without the web page (1 if the hub was unreadable).")

    aliases = {
        "interval": "Culler.interval_seconds",
        "concurrency": "Culler.concurrency",
        "policy": "Culler.policy_file",
        "telemetry": "Culler.telemetry",
        "max-run-hours": "Culler.max_run_hours",
        "pre-stop-hook": "Culler.pre_stop_hooks",
        "hook-timeout": "Culler.hook_timeout_seconds",
        "kernel-timeout": "Culler.kernel_timeout_seconds",
        "extensions-file": "Culler.extensions_file",
        "extend-hours": "Culler.extend_hours",
        "log-level": "Application.log_level",
    }
    flags = {
        "dry-run": ({"Culler": {"dry_run": True}}, "Decide and log only: stop nothing, record no activity."),
        "once": ({"Culler": {"once": True}}, "Sweep once and exit."),
    }

    @default("max_run_hours")
    def _default_max_run_hours(self) -> float:
        try:
            return env_float(os.environ, "DOLAB_MAX_RUN_HOURS", 168)
        except ValueError:
            return 168

    def _check(self) -> tuple[CullPolicy, HubClient]:
        for name, value in (
            ("--interval", self.interval_seconds),
            ("--kernel-timeout", self.kernel_timeout_seconds),
            ("--hook-timeout", self.hook_timeout_seconds),
            ("--extend-hours", self.extend_hours),
        ):
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive number of seconds, not {value:g}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, not {self.concurrency}")
        if self.max_run_hours < 0 or not math.isfinite(self.max_run_hours):
            raise ValueError(f"--max-run-hours must be 0 (no limit) or a positive number, not {self.max_run_hours:g}")
        policy = load_policy(self.policy_file) if self.policy_file else CullPolicy()
        return replace(policy, plans=plans_from_env()), HubClient()

    def start(self) -> None:
        """Check the settings, then sweep and serve until stopped (or sweep once)."""
        try:
            policy, hub = self._check()
            hooks = load_hooks(self.pre_stop_hooks)
            telemetry = load_telemetry(self.telemetry)
        except ValueError as e:
            self.fail(str(e))
        # The telemetry sources log under the package's name: through the same handler, in the same format.
        self.share_log()
        self.log.info(
            "Sweeping every %g s%s; policy %s; GPU use from %s; %d pre-stop hook(s)",
            self.interval_seconds,
            " (dry run)" if self.dry_run else "",
            self.policy_file or "built-in",
            self.telemetry,
            len(hooks),
        )
        self.run_until_stopped(lambda: self._run(policy, hub, hooks, telemetry))

    async def _run(self, policy: CullPolicy, hub: HubClient, hooks: list[Any], telemetry: TelemetrySource) -> int:
        from .web import make_app  # the page needs jupyterhub's OAuth helpers, a one-off sweep does not

        stop_path = StopPath(
            hub, hooks, hook_timeout_seconds=self.hook_timeout_seconds, dry_run=self.dry_run, log=self.log
        )
        sweeper = Sweeper(
            hub,
            policy,
            telemetry,
            stop_path,
            ServerTokens(hub, f"{SERVICE_NAME}: reads this server's kernels"),
            concurrency=self.concurrency,
            kernel_timeout_seconds=self.kernel_timeout_seconds,
            max_run_hours=self.max_run_hours,
            extensions=ExtensionStore(self.extensions_file or None, self.log),
            dry_run=self.dry_run,
            log=self.log,
        )
        server = None
        try:
            if self.once:
                try:
                    await sweeper.sweep()
                except HubAPIError as e:
                    self.log.error("Cannot list the hub's servers: %s", e)
                    return 1
                return 0
            # The JupyterLab notice polls as often as warnings can change, at most once a minute.
            poll_seconds = min(60.0, self.interval_seconds)
            server = self.serve_page(
                lambda prefix: make_app(
                    sweeper, prefix, extend_hours=self.extend_hours, poll_seconds=poll_seconds, log=self.log
                ),
                SERVICE_NAME,
                serves="page and API",
                goes_on="sweeps",  # culling is the part that protects the machine: it goes on without the page
                port_variable="DOLAB_CULLER_PORT",
            )
            await self.repeat(lambda: sweeper.sweep(wait_seconds=self.interval_seconds), self.interval_seconds, "sweep")
            return 0
        finally:
            if server is not None:
                server.stop()
            sweeper.close()
            await revoke_quietly(sweeper.server_tokens)
            hub.close()
            await telemetry.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dolab_services.culler``."""
    Culler.launch_instance(list(argv) if argv is not None else None)
