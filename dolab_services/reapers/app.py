"""The reapers as programs: ``python -m dolab_services.reapers docker`` (:class:`Reaper`) and
``python -m dolab_services.reapers runpod`` (:class:`RunPodReaper`), each a sweep every ``--interval`` seconds on
ServiceApp's work loop, or one sweep with ``--once``::

    python -m dolab_services.reapers docker [--interval 600] [--grace-seconds 300] [--remove] [--once]
                                            [--docker-hosts JSON]  # default: $DOLAB_DOCKER_HOSTS, else local
                                            [--hub-id ID]          # default: $DOLAB_HUB_ID, else <data dir>/hub-id
    python -m dolab_services.reapers runpod [--interval 600] [--grace-seconds 600] [--terminate] [--once]
                                            [--prefix dolab-] [--hub-id ID]

The RunPod reaper's key comes from ``$RUNPOD_API_KEY`` (and the API's address from ``$RUNPOD_API_BASE_URL``, as
for the SDK).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from traitlets import Bool, Float, Integer, Unicode, default

from dolab_core.engines.runpod import RunPodApi, hub_pod_prefix
from dolab_core.hubidentity import check_hub_id, hub_id

from ..app import ServiceApp
from ..hubclient import HubClient
from .docker import SweepResult, parse_docker_hosts, sweep
from .registration import DEFAULT_HOSTS, REAPER_NAME, RUNPOD_REAPER_NAME
from .runpod import PodSweepResult, sweep_pods

__all__ = ["Reaper", "RunPodReaper", "main_docker", "main_runpod"]


class _ReaperApp(ServiceApp):
    """What both reapers share: a sweep every ``interval_seconds`` (or one, ``once``), the hub's id, a hub client."""

    interval_seconds = Float(600, config=True, help="Seconds between two sweeps.")
    once = Bool(False, config=True, help="Sweep once and exit (1 when what it sweeps could not be read).")
    hub_concurrency = Integer(4, config=True, help="At most this many hub API requests at once.")
    hub_id = Unicode(
        "",
        config=True,
        help="""The hub's id: only what carries it (a container's ``dolab.hub`` label, a pod's name) is reaped.
        Default: ``$DOLAB_HUB_ID``, which the hub sets for its service, else the one kept in the data directory.""",
    )

    def hub_and_identity(self) -> tuple[HubClient, str]:
        """The hub client and the hub's id, after the shared checks; ValueError with a sentence."""
        if self.interval_seconds <= 0:
            raise ValueError(f"--interval must be a positive number of seconds, not {self.interval_seconds:g}")
        hub = HubClient(concurrency=self.hub_concurrency)
        return hub, check_hub_id(self.hub_id, "--hub-id") if self.hub_id else hub_id(create=False)


class Reaper(_ReaperApp):
    """The ``dolab-reaper`` service: :func:`.docker.sweep` every ``interval_seconds``, or once."""

    name = REAPER_NAME
    description = "Report (or remove, with --remove) DO-LAB's Docker containers that no server in the hub owns."

    grace_seconds = Float(
        300,
        config=True,
        help="Containers younger than this (seconds) are never reaped: their server may be starting right now.",
    )
    remove = Bool(False, config=True, help="Force-remove orphans; without it, only log them (a dry run).")
    docker_hosts = Unicode(
        config=True,
        help="""The hub's ``DoLabSpawner.docker_hosts`` as JSON, e.g. ``[{"name": "local"}]``.
        Default: ``$DOLAB_DOCKER_HOSTS``, else the local engine.""",
    )
    docker_timeout_seconds = Float(30, config=True, help="SDK timeout of one Docker call (seconds).")
    docker_pool_size = Integer(4, config=True, help="Threads per engine for Docker calls.")

    aliases = {
        "hub-id": "Reaper.hub_id",
        "interval": "Reaper.interval_seconds",
        "grace-seconds": "Reaper.grace_seconds",
        "docker-hosts": "Reaper.docker_hosts",
        "docker-timeout": "Reaper.docker_timeout_seconds",
        "concurrency": "Reaper.hub_concurrency",
        "log-level": "Application.log_level",
    }
    flags = {
        "remove": ({"Reaper": {"remove": True}}, "Force-remove orphans (default: only log them)."),
        "once": ({"Reaper": {"once": True}}, "Sweep once and exit."),
    }

    @default("docker_hosts")
    def _default_docker_hosts(self) -> str:
        return os.environ.get("DOLAB_DOCKER_HOSTS") or json.dumps(DEFAULT_HOSTS)

    def start(self) -> None:
        """Check the settings, then sweep until stopped (or once)."""
        try:
            hosts = parse_docker_hosts(self.docker_hosts)
            hub, identity = self.hub_and_identity()
        except ValueError as e:
            self.fail(str(e))
        mode = "removing orphans" if self.remove else "dry run: reporting orphans only"
        self.log.info(
            "Sweeping hub %s's containers on %s every %g s (%s; grace %g s)",
            identity,
            ", ".join(h["name"] for h in hosts),
            self.interval_seconds,
            mode,
            self.grace_seconds,
        )
        self.run_until_stopped(lambda: self._run(hub, hosts, identity))

    async def _run(self, hub: HubClient, hosts: list[dict[str, Any]], identity: str) -> int:
        reported: set[str] = set()
        last = [SweepResult()]

        async def one_sweep() -> None:
            last[0] = SweepResult(hub_error="the sweep failed")  # what --once reports if the sweep raises
            last[0] = await sweep(
                hub,
                hosts,
                hub_id=identity,
                reported=reported,
                remove=self.remove,
                grace_seconds=self.grace_seconds,
                docker_timeout_seconds=self.docker_timeout_seconds,
                docker_pool_size=self.docker_pool_size,
                log=self.log,
            )

        async with hub:
            await self.repeat(one_sweep, self.interval_seconds, "sweep", once=self.once)
        return 1 if last[0].hub_error else 0


class RunPodReaper(_ReaperApp):
    """The ``dolab-runpod-reaper`` service: :func:`.runpod.sweep_pods` every ``interval_seconds``, or once."""

    name = RUNPOD_REAPER_NAME
    description = "Report (or terminate, with --terminate) DO-LAB's RunPod pods that no server in the hub owns."

    grace_seconds = Float(
        600,
        config=True,
        help="""An orphan is acted on only after it has been one for this long (seconds): its server may be
        starting. With --once, use 0 to act at once.""",
    )
    terminate = Bool(False, config=True, help="Terminate orphans; without it, only log them (a dry run).")
    prefix = Unicode("dolab-", config=True, help="The hub's pod name prefix (RunPodBackend.pod_name_prefix).")

    aliases = {
        "hub-id": "RunPodReaper.hub_id",
        "interval": "RunPodReaper.interval_seconds",
        "grace-seconds": "RunPodReaper.grace_seconds",
        "prefix": "RunPodReaper.prefix",
        "concurrency": "RunPodReaper.hub_concurrency",
        "log-level": "Application.log_level",
    }
    flags = {
        "terminate": ({"RunPodReaper": {"terminate": True}}, "Terminate orphans (default: only log them)."),
        "once": ({"RunPodReaper": {"once": True}}, "Sweep once and exit."),
    }

    def start(self) -> None:
        """Check the settings, then sweep until stopped (or once)."""
        key = os.environ.get("RUNPOD_API_KEY", "")
        try:
            if not key:
                raise ValueError("RUNPOD_API_KEY is not set")
            if not self.prefix:
                raise ValueError("--prefix must not be empty: every pod of the account would be a candidate")
            hub, identity = self.hub_and_identity()
        except ValueError as e:
            self.fail(str(e))
        prefix = hub_pod_prefix(self.prefix, identity)
        mode = "terminating orphans" if self.terminate else "dry run: reporting orphans only"
        self.log.info(
            "Sweeping RunPod pods %s* every %g s (%s; grace %g s)",
            prefix,
            self.interval_seconds,
            mode,
            self.grace_seconds,
        )
        self.run_until_stopped(lambda: self._run(hub, RunPodApi(key, log=self.log), prefix))

    async def _run(self, hub: HubClient, api: RunPodApi, prefix: str) -> int:
        first_seen: dict[str, float] = {}
        last = [PodSweepResult()]

        async def one_sweep() -> None:
            last[0] = PodSweepResult(error="the sweep failed")  # what --once reports if the sweep raises
            last[0] = await sweep_pods(
                hub,
                api,
                prefix,
                terminate=self.terminate,
                grace_seconds=self.grace_seconds,
                first_seen=first_seen,
                log=self.log,
            )

        async with hub:
            await self.repeat(one_sweep, self.interval_seconds, "sweep", once=self.once)
        return 1 if last[0].error else 0


def main_docker(argv: Sequence[str] | None = None) -> None:
    """``python -m dolab_services.reapers docker``."""
    Reaper.launch_instance(list(argv) if argv is not None else None)


def main_runpod(argv: Sequence[str] | None = None) -> None:
    """``python -m dolab_services.reapers runpod``."""
    RunPodReaper.launch_instance(list(argv) if argv is not None else None)
