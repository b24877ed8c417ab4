"""dolab-runpod-reaper: find the RunPod pods DO-LAB rented that no server in the hub owns, and report or terminate them.

A pod keeps billing until it is terminated. A hub that crashed during a start (its state is saved only after
``start()`` returns), a restored database, or a terminate that failed leaves pods behind. Every ``--interval``
seconds the reaper lists the account's pods whose name starts with this hub's prefix, ``<pod_name_prefix><hub id>-``
(``RunPodBackend.pod_name_prefix``, default ``dolab-``, and the hub's id from :mod:`dolab_core.hubidentity`),
asks the hub which servers exist, and logs one line per orphan (the default, a dry run) or terminates it
(``--terminate``)::

    python -m dolab_services.runpod_reaper [--interval 600] [--grace-seconds 600] [--terminate] [--once]
                                           [--prefix dolab-] [--hub-id ID]   # default: $DOLAB_HUB_ID

Another hub's pods on the same account (another id), a pod made by hand (``dolab-finetune``) and pods from before
hub ids (``dolab-<user>``) never carry this hub's prefix, so they are never candidates; the latter are still
found by their servers through the pod id in their state.

The RunPod key comes from ``$RUNPOD_API_KEY`` (and the API's address from ``$RUNPOD_API_BASE_URL``, as for the
SDK). The shipped ``jupyterhub_config.py`` runs it as a hub-managed service (:func:`runpod_reaper_service`) when a
profile uses the runpod backend; ``DOLAB_RUNPOD_REAPER_TERMINATE=1`` turns termination on, ``DOLAB_RUNPOD_REAPER=0``
leaves the service out.

Scopes (role ``dolab-runpod-reaper``): ``list:users``, ``read:users:name``, ``read:servers``,
``admin:server_state`` (a server's state names its pod). It terminates pods through RunPod, never through the hub.

What is kept (:func:`find_pod_orphans`): a pod that a server's state names (by id); a stopped (EXITED) pod, whose
disk may hold unsynced work and which the server's next start resumes (billed for storage only, it is left to an
admin); a pod whose name is the
deterministic name of a server the hub lists as pending (starting or stopping) or whose state names no pod yet;
and a pod first seen as an orphan less than ``--grace-seconds`` ago (RunPod does not say when a pod was created).
A sweep acts on nothing when the hub cannot be read or does not show the servers' state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from traitlets import Bool, Float, Integer, Unicode
from traitlets.config import Config

from dolab_core.engines.runpod import PodInfo, RunPodApi, RunPodError, hub_pod_prefix, pod_name
from dolab_core.hubconfig import config_value, env_float
from dolab_core.hubidentity import HUB_ID_ENV, check_hub_id, hub_id

from .app import ServiceApp
from .hubclient import HubAPIError, HubClient
from .reaper import servers_of, state_problem

__all__ = [
    "RUNPOD_REAPER_SCOPES",
    "PodOrphan",
    "PodSweepResult",
    "RunPodReaper",
    "find_pod_orphans",
    "main",
    "runpod_reaper_service",
    "sweep_pods",
]

#: What the reaper's token needs, and what the shipped config's ``dolab-runpod-reaper`` role grants.
RUNPOD_REAPER_SCOPES = ("list:users", "read:users:name", "read:servers", "admin:server_state")


@dataclass(frozen=True)
class PodOrphan:
    """A DO-LAB pod that no server in the hub owns, and why."""

    id: str
    name: str
    status: str
    price_per_hour_usd: float
    reason: str

    def describe(self) -> str:
        """One log line's worth: name, id, status, cost, why."""
        return (
            f"pod {self.name} (id {self.id}, {self.status or 'unknown status'}, ${self.price_per_hour_usd:.2f}/h): "
            f"{self.reason}"
        )


@dataclass
class PodSweepResult:
    """What one sweep found and did; ``error`` is set when it acted on nothing (hub or RunPod unreadable)."""

    pods: int = 0
    orphans: list[PodOrphan] = field(default_factory=list)
    waiting: list[PodOrphan] = field(default_factory=list)  # orphans still within the grace period
    stopped: list[PodOrphan] = field(default_factory=list)  # stopped pods: a disk kept on purpose, never terminated
    terminated: list[PodOrphan] = field(default_factory=list)
    failed: list[PodOrphan] = field(default_factory=list)
    error: str = ""


def find_pod_orphans(pods: Sequence[PodInfo], servers: Sequence[Mapping[str, Any]], prefix: str) -> list[PodOrphan]:
    """The pods with ``prefix`` (the hub's own, ``<pod_name_prefix><hub id>-``) that no server owns (see the
    module's docstring for what is kept); pure.

    ``servers``: the hub's server models with their ``user`` and ``name`` (``reaper.servers_of``), ``pending``
    and ``state``.
    """
    owned_ids: set[str] = set()
    by_name: dict[str, Mapping[str, Any]] = {}
    for server in servers:
        state = server.get("state") or {}
        pod_id = (state.get("backend_state") or {}).get("pod_id") if state.get("backend") == "runpod" else None
        if pod_id:
            owned_ids.add(str(pod_id))
        by_name[pod_name(prefix, str(server.get("user", "")), str(server.get("name", "")))] = server
    orphans = []
    for pod in pods:
        if not pod.name.startswith(prefix) or pod.id in owned_ids:
            continue
        owner = by_name.get(pod.name)
        if owner is None:
            reason = "the hub lists no server with this pod name"
        else:
            state = owner.get("state") or {}
            backend_state = state.get("backend_state") or {}
            label = f"{owner.get('user')}/{owner.get('name')}" if owner.get("name") else str(owner.get("user"))
            if owner.get("pending") or (state.get("backend") in (None, "runpod") and not backend_state.get("pod_id")):
                continue  # starting, stopping, or about to adopt it by name
            if state.get("backend") != "runpod":
                reason = f"server {label} now runs on the {state.get('backend')} backend"
            else:
                reason = f"server {label} runs pod {backend_state.get('pod_id')}"
        orphans.append(PodOrphan(pod.id, pod.name, pod.desired_status, pod.cost_per_hr, reason))
    return orphans


async def sweep_pods(
    hub: HubClient,
    api: RunPodApi,
    prefix: str,
    *,
    terminate: bool = False,
    grace_seconds: float = 600,
    first_seen: dict[str, float] | None = None,
    log: logging.Logger | None = None,
) -> PodSweepResult:
    """One pass: list the pods, read the hub, log (and with ``terminate`` terminate) the orphans.

    ``first_seen`` (pod id -> when it was first an orphan) carries the grace period from sweep to sweep.
    """
    log = log or logging.getLogger("dolab.runpod_reaper")
    first_seen = first_seen if first_seen is not None else {}
    result = PodSweepResult()
    # Pods first, then the hub: every pod seen existed before the hub's answer was made.
    try:
        pods = await api.list_pods(prefix)
    except RunPodError as e:
        result.error = f"RunPod: {e}"
        log.error("Cannot list the RunPod pods, so nothing is reaped this sweep: %s", e)
        return result
    result.pods = len(pods)
    try:
        users = [user async for user in hub.users(state="active")]
        problem = state_problem(users)
        if problem:
            raise HubAPIError(200, problem)
    except HubAPIError as e:
        result.error = f"hub: {e}"
        log.error("Cannot read the hub's servers, so nothing is reaped this sweep: %s", e)
        return result
    now = time.monotonic()
    orphans = find_pod_orphans(pods, servers_of(users), prefix)
    for gone in set(first_seen) - {o.id for o in orphans}:
        del first_seen[gone]
    for orphan in orphans:
        if orphan.status == "EXITED":
            # Stopped on purpose (stop_action "stop", or a failed workspace sync): its disk may hold the only copy
            # of a user's work, and the server's next start resumes it. Billed for storage only; never terminated.
            result.stopped.append(orphan)
            log.debug("Stopped %s; kept (its disk may hold unsynced work)", orphan.describe())
            continue
        since = first_seen.setdefault(orphan.id, now)
        if now - since < grace_seconds:
            result.waiting.append(orphan)
            continue
        result.orphans.append(orphan)
        if not terminate:
            log.info("Orphan %s. Dry run: not terminated (--terminate terminates it)", orphan.describe())
            continue
        try:
            await api.terminate_pod(orphan.id)
        except RunPodError as e:
            result.failed.append(orphan)
            log.error("Could not terminate orphan %s: %s", orphan.describe(), e)
            continue
        first_seen.pop(orphan.id, None)
        result.terminated.append(orphan)
        log.info("Terminated orphan %s", orphan.describe())
    log.log(
        logging.INFO if result.orphans else logging.DEBUG,
        "Sweep done: %d DO-LAB pod(s), %d orphan(s) (%d within the grace period), %d terminated",
        result.pods,
        len(result.orphans),
        len(result.waiting),
        len(result.terminated),
    )
    return result


def runpod_reaper_service(
    config: Config, env: Mapping[str, str], python: str = sys.executable
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The hub-managed service and its role, when a listed profile uses the runpod backend (else None, and None
    with ``DOLAB_RUNPOD_REAPER=0``)."""
    if env.get("DOLAB_RUNPOD_REAPER") == "0":
        return None
    profiles = config_value(config, "DoLabSpawner", "profile_list", [])
    if not isinstance(profiles, (list, tuple)):
        return None
    if not any(isinstance(p, Mapping) and p.get("backend") == "runpod" for p in profiles):
        return None
    services = config_value(config, "JupyterHub", "services", [])
    if any(isinstance(s, Mapping) and s.get("name") == "dolab-runpod-reaper" for s in services):
        return None
    interval = env_float(env, "DOLAB_RUNPOD_REAPER_INTERVAL", 600)
    if interval <= 0:
        raise ValueError(f"DOLAB_RUNPOD_REAPER_INTERVAL must be a positive number of seconds, not {interval:g}")
    prefix = config_value(config, "RunPodBackend", "pod_name_prefix", "dolab-")
    command = [python, "-m", "dolab_services.runpod_reaper", "--interval", f"{interval:g}", "--prefix", prefix]
    if env.get("DOLAB_RUNPOD_REAPER_TERMINATE") == "1":
        command.append("--terminate")
    # A managed service keeps none of the hub's environment: the key (hub side only), the API's address, and the
    # hub's id (the one its pod names carry), read here, in the hub's process.
    key = config_value(config, "RunPodBackend", "api_key", "") or env.get("RUNPOD_API_KEY", "")
    environment = {"RUNPOD_API_KEY": key, HUB_ID_ENV: hub_id(env)}
    if env.get("RUNPOD_API_BASE_URL"):
        environment["RUNPOD_API_BASE_URL"] = env["RUNPOD_API_BASE_URL"]
    service = {"name": "dolab-runpod-reaper", "command": command, "environment": environment}
    role = {
        "name": "dolab-runpod-reaper",
        "description": "Find DO-LAB RunPod pods no server owns (read servers and their state)",
        "scopes": list(RUNPOD_REAPER_SCOPES),
        "services": ["dolab-runpod-reaper"],
    }
    return service, role


class RunPodReaper(ServiceApp):
    """The ``dolab-runpod-reaper`` service: :func:`sweep_pods` every ``interval_seconds``, or once."""

    name = "dolab-runpod-reaper"
    description = "Report (or terminate, with --terminate) DO-LAB's RunPod pods that no server in the hub owns."

    interval_seconds = Float(600, config=True, help="Seconds between two sweeps.")
    grace_seconds = Float(
        600,
        config=True,
        help="""An orphan is acted on only after it has been one for this long (seconds): its server may be
        starting. With --once, use 0 to act at once.""",
    )
    terminate = Bool(False, config=True, help="Terminate orphans; without it, only log them (a dry run).")
    once = Bool(False, config=True, help="Sweep once and exit (1 when the hub or RunPod could not be read).")
    prefix = Unicode("dolab-", config=True, help="The hub's pod name prefix (RunPodBackend.pod_name_prefix).")
    hub_id = Unicode(
        "",
        config=True,
        help="""The hub's id: only pods named ``<prefix><hub id>-...`` are candidates. Default: ``$DOLAB_HUB_ID``,
        which the hub sets for its service, else the one kept in the data directory.""",
    )
    hub_concurrency = Integer(4, config=True, help="At most this many hub API requests at once.")

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
            if self.interval_seconds <= 0:
                raise ValueError(f"--interval must be a positive number of seconds, not {self.interval_seconds:g}")
            if not key:
                raise ValueError("RUNPOD_API_KEY is not set")
            if not self.prefix:
                raise ValueError("--prefix must not be empty: every pod of the account would be a candidate")
            hub = HubClient(concurrency=self.hub_concurrency)
            identity = check_hub_id(self.hub_id, "--hub-id") if self.hub_id else hub_id(create=False)
        except ValueError as e:
            print(f"dolab-runpod-reaper: {e}", file=sys.stderr)
            self.exit(2)
        prefix = hub_pod_prefix(self.prefix, identity)
        mode = "terminating orphans" if self.terminate else "dry run: reporting orphans only"
        self.log.info(
            "Sweeping RunPod pods %s* every %g s (%s; grace %g s)",
            prefix,
            self.interval_seconds,
            mode,
            self.grace_seconds,
        )
        self.exit(asyncio.run(self._run(hub, RunPodApi(key, log=self.log), prefix)))

    async def _run(self, hub: HubClient, api: RunPodApi, prefix: str) -> int:
        first_seen: dict[str, float] = {}
        async with hub:
            while True:
                try:
                    result = await sweep_pods(
                        hub,
                        api,
                        prefix,
                        terminate=self.terminate,
                        grace_seconds=self.grace_seconds,
                        first_seen=first_seen,
                        log=self.log,
                    )
                except Exception:  # a bug in one sweep must not end the service
                    self.log.exception("The sweep failed; trying again in %g s", self.interval_seconds)
                    result = PodSweepResult(error="the sweep failed")
                if self.once:
                    return 1 if result.error else 0
                await asyncio.sleep(self.interval_seconds)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dolab_services.runpod_reaper``."""
    app = RunPodReaper()
    app.initialize(list(argv) if argv is not None else None)
    app.start()


if __name__ == "__main__":
    main()
