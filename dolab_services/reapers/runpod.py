"""The RunPod reaper's work: find the pods DO-LAB rented that no server in the hub owns, log or terminate them.

A pod keeps billing until it is terminated. A hub that crashed during a start (its state is saved only after
``start()`` returns), a restored database, or a terminate that failed leaves pods behind. A sweep
(:func:`sweep_pods`) lists the account's pods whose name starts with this hub's prefix,
``<pod_name_prefix><hub id>-`` (``RunPodBackend.pod_name_prefix``, default ``dolab-``, and the hub's id from
:mod:`dolab_core.hubidentity`), asks the hub which servers exist, and logs one line per orphan (the default, a dry
run) or terminates it (``--terminate``).

Another hub's pods on the same account (another id), a pod made by hand (``dolab-finetune``) and pods from before
hub ids (``dolab-<user>``) never carry this hub's prefix, so they are never candidates; the latter are still
found by their servers through the pod id in their state.

What is kept (:func:`find_pod_orphans`): a pod that a server's state names (by id); a stopped (EXITED) pod, whose
disk may hold unsynced work and which the server's next start resumes (billed for storage only, it is left to an
admin); a pod whose name is the deterministic name of a server the hub lists as pending (starting or stopping) or
whose state names no pod yet; and a pod first seen as an orphan less than ``--grace-seconds`` ago (RunPod does not
say when a pod was created). A sweep acts on nothing when the hub cannot be read or does not show the servers'
state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dolab_core.engines.runpod import PodInfo, RunPodApi, RunPodError, pod_name
from dolab_core.serverstate import ServerState

from ..hubclient import HubAPIError, HubClient
from .servers import servers_of, state_problem

__all__ = ["PodOrphan", "PodSweepResult", "find_pod_orphans", "sweep_pods"]


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

    ``servers``: the hub's server models with their ``user`` and ``name`` (:func:`.servers.servers_of`),
    ``pending`` and ``state``.
    """
    owned_ids: set[str] = set()
    by_name: dict[str, Mapping[str, Any]] = {}
    for server in servers:
        pod_id = ServerState.of(server).pod_id
        if pod_id:
            owned_ids.add(pod_id)
        by_name[pod_name(prefix, str(server.get("user", "")), str(server.get("name", "")))] = server
    orphans = []
    for pod in pods:
        if not pod.name.startswith(prefix) or pod.id in owned_ids:
            continue
        owner = by_name.get(pod.name)
        if owner is None:
            reason = "the hub lists no server with this pod name"
        else:
            state = ServerState.of(owner)
            label = f"{owner.get('user')}/{owner.get('name')}" if owner.get("name") else str(owner.get("user"))
            if owner.get("pending") or (state.backend in ("", "runpod") and not state.pod_id):
                continue  # starting, stopping, or about to adopt it by name
            if state.backend != "runpod":
                reason = f"server {label} now runs on the {state.backend} backend"
            else:
                reason = f"server {label} runs pod {state.pod_id}"
        orphans.append(PodOrphan(pod.id, pod.name, pod.desired_status, pod.cost_per_hr, reason))
    return orphans


def _due(
    orphans: Sequence[PodOrphan],
    first_seen: dict[str, float],
    now: float,
    grace_seconds: float,
    result: PodSweepResult,
    log: logging.Logger,
) -> None:
    """Sort the orphans: stopped pods are kept, those within their grace period wait, the rest are due
    (``result.orphans``). ``first_seen`` forgets the pods that are no longer orphans."""
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


async def _terminate(api: RunPodApi, result: PodSweepResult, first_seen: dict[str, float], log: logging.Logger) -> None:
    """Terminate the due orphans; one that fails is logged and the others go on."""
    for orphan in result.orphans:
        try:
            await api.terminate_pod(orphan.id)
        except RunPodError as e:
            result.failed.append(orphan)
            log.error("Could not terminate orphan %s: %s", orphan.describe(), e)
            continue
        first_seen.pop(orphan.id, None)
        result.terminated.append(orphan)
        log.info("Terminated orphan %s", orphan.describe())


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
    _due(find_pod_orphans(pods, servers_of(users), prefix), first_seen, time.monotonic(), grace_seconds, result, log)
    if terminate:
        await _terminate(api, result, first_seen, log)
    else:
        for orphan in result.orphans:
            log.info("Orphan %s. Dry run: not terminated (--terminate terminates it)", orphan.describe())
    log.log(
        logging.INFO if result.orphans else logging.DEBUG,
        "Sweep done: %d DO-LAB pod(s), %d orphan(s) (%d within the grace period), %d terminated",
        result.pods,
        len(result.orphans),
        len(result.waiting),
        len(result.terminated),
    )
    return result
