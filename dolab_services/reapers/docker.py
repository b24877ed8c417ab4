"""The Docker reaper's work: find the containers DO-LAB made that no server in the hub owns, log or remove them.

The hub saves a server's state only after its start returns, so a hub that crashes during a start, a restored
database, or a hub that forgot a server at restart leaves containers behind, each holding its GPUs. A sweep
(:func:`sweep`) lists the containers labelled ``dolab.managed=true`` on every engine of ``docker_hosts``, asks the
hub which servers exist, and logs each orphan (the default, a dry run) or force-removes it (``--remove``).

Only this hub's containers are ever orphans: those labelled ``dolab.hub=<this hub's id>``
(:mod:`dolab_core.hubidentity`). Another hub's on a shared engine, and one made by hand, are never touched. A
container from before hub ids (``dolab.managed=true`` without ``dolab.hub``) cannot be told apart from another
hub's or a hand-made one: it is kept while a server's state names it (its server still runs it), else logged once
as left alone, for an admin to remove.

What is kept, in the order :func:`find_orphans` checks: a container younger than ``--grace-seconds``; one that a
server's state names (by id, or by name on the same engine); one whose server (labels ``dolab.user`` and
``dolab.server``) is pending (starting or stopping, its state may be empty) or names no container at all. A sweep
removes nothing when the hub cannot be read or does not show the servers' state, and each orphan is checked again
against its user's own model just before it is reported or removed. One engine that does not answer, or one
container that cannot be removed, is logged and the sweep goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import quote

from dolab_core.engines.docker import DOLAB_LABEL, HUB_LABEL, check_docker_hosts, engines
from dolab_core.hubidentity import check_hub_id
from dolab_core.serverstate import ServerState

from ..hubclient import HubAPIError, HubClient
from .servers import servers_of, state_problem

__all__ = [
    "Orphan",
    "SweepResult",
    "container_record",
    "find_orphans",
    "parse_docker_hosts",
    "sweep",
    "unclaimed",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Orphan:
    """A DO-LAB container that no server in the hub owns, and why."""

    engine: str
    id: str
    name: str
    user: str
    server: str
    created: float  # unix seconds
    reason: str

    @property
    def since(self) -> str:
        """When the container was created, in UTC."""
        return datetime.fromtimestamp(self.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def describe(self, now: float) -> str:
        """One log line's worth: name, id, engine, user, server, since when, why."""
        return (
            f"container {self.name} (id {self.id[:12]}) on engine {self.engine}: user {self.user or '?'}, "
            f"server {self.server or '(default)'}, since {self.since} ({_age(now - self.created)} ago); {self.reason}"
        )


@dataclass
class SweepResult:
    """What one sweep found and did; ``hub_error`` is set when it acted on nothing because the hub was unreadable."""

    containers: int = 0
    orphans: list[Orphan] = field(default_factory=list)
    removed: list[Orphan] = field(default_factory=list)
    failed: list[Orphan] = field(default_factory=list)
    engines_down: list[str] = field(default_factory=list)
    hub_error: str = ""
    others: int = 0  # DO-LAB containers of another hub (or none named), left alone
    unclaimed: list[dict[str, Any]] = field(default_factory=list)  # from before hub ids, owned by no server


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


# ----- pure policy -----------------------------------------------------------------------------------------


def container_record(engine: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """A container as :func:`find_orphans` reads it, from docker's ``containers()`` entry found on ``engine``."""
    names = raw.get("Names") or []
    return {
        "engine": engine,
        "id": str(raw.get("Id", "")),
        "name": str(names[0]).lstrip("/") if names else "",
        "labels": dict(raw.get("Labels") or {}),
        "created": float(raw.get("Created") or 0),
    }


def _same_id(a: str, b: str) -> bool:
    """Full ids, or one a prefix (12+ characters) of the other."""
    return bool(a and b) and (a == b or (min(len(a), len(b)) >= 12 and (a.startswith(b) or b.startswith(a))))


def _owned(servers: Sequence[Mapping[str, Any]]) -> tuple[list[str], set[tuple[str, str]]]:
    """The container ids and (engine, name)s that the servers' state names."""
    owned_ids: list[str] = []
    owned_names: set[tuple[str, str]] = set()
    for server in servers:
        state = ServerState.of(server)
        if state.backend == "docker":
            engine, object_id, object_name = state.container
            owned_ids.extend([object_id] if object_id else [])
            owned_names.update([(engine, object_name)] if object_name else [])
    return owned_ids, owned_names


def _is_owned(container: Mapping[str, Any], owned_ids: list[str], owned_names: set[tuple[str, str]]) -> bool:
    engine, cid = str(container.get("engine", "")), str(container.get("id", ""))
    return (engine, str(container.get("name", ""))) in owned_names or any(_same_id(cid, o) for o in owned_ids)


def unclaimed(containers: Sequence[Mapping[str, Any]], servers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The DO-LAB containers from before hub ids (no ``dolab.hub`` label) that no server's state names: maybe this
    hub's leftovers, maybe another hub's or hand-made; never removed, only reported."""
    owned_ids, owned_names = _owned(servers)
    return [
        dict(c)
        for c in containers
        if (c.get("labels") or {}).get(DOLAB_LABEL) == "true"
        and not (c.get("labels") or {}).get(HUB_LABEL)
        and not _is_owned(c, owned_ids, owned_names)
    ]


def find_orphans(
    containers: Sequence[Mapping[str, Any]],
    servers: Sequence[Mapping[str, Any]],
    now: float,
    grace_seconds: float,
    hub_id: str,
) -> list[Orphan]:
    """The containers of hub ``hub_id`` that no server owns (see the module's docstring for what is kept).

    ``containers``: :func:`container_record` dicts (engine, id, name, labels, created). ``servers``: the hub's
    server models with their ``user`` and ``name`` (:func:`servers_of`), ``pending`` and ``state``. Only
    containers labelled ``dolab.hub=<hub_id>`` can be orphans.
    """
    check_hub_id(hub_id, "the hub id")
    owned_ids, owned_names = _owned(servers)
    by_key: dict[tuple[str, str], Mapping[str, Any]] = {
        (str(server.get("user", "")), str(server.get("name", ""))): server for server in servers
    }

    orphans = []
    for container in containers:
        labels = container.get("labels") or {}
        if labels.get(DOLAB_LABEL) != "true" or labels.get(HUB_LABEL) != hub_id:
            continue  # not DO-LAB's, another hub's, or from before hub ids: never this reaper's to remove
        if now - float(container.get("created") or 0) < grace_seconds:
            continue
        engine, cid = str(container.get("engine", "")), str(container.get("id", ""))
        cname = str(container.get("name", ""))
        if _is_owned(container, owned_ids, owned_names):
            continue
        user, name = str(labels.get("dolab.user", "")), str(labels.get("dolab.server", ""))
        label = f"{user}/{name}" if name else user
        found = by_key.get((user, name))
        reason = ""
        if found is None:
            reason = f"the hub lists no server {label}"
        elif not found.get("pending"):
            state = ServerState.of(found)
            on_engine, object_id, object_name = state.container
            if state.backend and state.backend != "docker":
                reason = f"server {label} now runs on the {state.backend} backend"
            elif state.backend and on_engine != engine:
                reason = f"server {label} runs on engine {on_engine}"
            elif object_id or object_name:
                reason = f"server {label} runs container {object_name or object_id[:12]}"
        if reason:
            orphans.append(Orphan(engine, cid, cname, user, name, float(container.get("created") or 0), reason))
    return orphans


# ----- the sweep -------------------------------------------------------------------------------------------


async def _on_engine(host: Mapping[str, Any], timeout_seconds: float, pool_size: int, call: Callable[[Any], T]) -> T:
    """``call(client)`` on the engine's own thread pool, under the SDK's timeout and a wait of our own."""

    def run() -> T:
        return call(engines.client(dict(host), timeout_seconds))

    future = engines.pool(dict(host), pool_size, purpose="reaper").submit(run)
    return await asyncio.wait_for(asyncio.wrap_future(future), timeout_seconds + 5)


async def _list_engine(
    host: Mapping[str, Any], label_filters: Sequence[str], timeout_seconds: float, pool_size: int
) -> list[dict[str, Any]]:
    filters = {"label": [f"{DOLAB_LABEL}=true", *label_filters]}
    raw = await _on_engine(host, timeout_seconds, pool_size, lambda c: c.containers(all=True, filters=filters))
    return [container_record(str(host["name"]), entry) for entry in raw]


def _remover(container_id: str) -> Callable[[Any], Any]:
    return lambda client: client.remove_container(container_id, force=True)


def _reason(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "no answer in time"
    text = str(getattr(error, "explanation", None) or error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


async def _confirm(
    hub: HubClient, orphan: Orphan, container: Mapping[str, Any], now: float, grace: float, hub_id: str
) -> bool:
    """Ask again for the orphan's own user, just before acting: a paged list can miss a user that moved pages."""
    if not orphan.user:
        return True
    try:
        user = await hub.request("GET", f"/users/{quote(orphan.user, safe='')}")
    except HubAPIError as e:
        if e.status == 404:
            return True
        raise
    if not isinstance(user, Mapping) or state_problem([user]):
        return False
    return bool(find_orphans([container], servers_of([user]), now, grace, hub_id))


async def _list_engines(
    hosts: Sequence[Mapping[str, Any]],
    label_filters: Sequence[str],
    timeout_seconds: float,
    pool_size: int,
    result: SweepResult,
    log: logging.Logger,
) -> list[dict[str, Any]]:
    """DO-LAB's containers on every engine that answers; the others are named in ``result.engines_down``."""
    containers: list[dict[str, Any]] = []
    listings = await asyncio.gather(
        *(_list_engine(h, label_filters, timeout_seconds, pool_size) for h in hosts), return_exceptions=True
    )
    for host, listing in zip(hosts, listings, strict=True):
        if isinstance(listing, BaseException):
            result.engines_down.append(str(host["name"]))
            log.warning(
                "Docker engine %s is not answering (%s); skipping it this sweep", host["name"], _reason(listing)
            )
        else:
            containers.extend(listing)
    return containers


def _report_unclaimed(result: SweepResult, reported: set[str], log: logging.Logger) -> None:
    """Log each container from before hub ids once (``reported`` carries which were, from sweep to sweep)."""
    for old in result.unclaimed:
        if old["id"] not in reported:
            reported.add(old["id"])
            log.info(
                "Leaving container %s (id %s) on engine %s alone: labelled dolab.managed but without a hub id (made"
                " before hub ids, by another hub or by hand) and no server of this hub runs it; remove it yourself"
                " if it is a leftover",
                old["name"],
                old["id"][:12],
                old["engine"],
            )
    reported.intersection_update(old["id"] for old in result.unclaimed)  # bounded by what is still there


async def _remove_orphans(
    hosts: Sequence[Mapping[str, Any]],
    result: SweepResult,
    now: float,
    timeout_seconds: float,
    pool_size: int,
    log: logging.Logger,
) -> None:
    """Force-remove ``result.orphans``, each on its engine; one that fails is logged and the others go on."""
    hosts_by_name = {str(h["name"]): h for h in hosts}
    for orphan in result.orphans:
        try:
            await _on_engine(hosts_by_name[orphan.engine], timeout_seconds, pool_size, _remover(orphan.id))
        except Exception as e:
            if getattr(e, "status_code", None) == 404:
                log.info("Orphan %s; already gone", orphan.describe(now))
                continue
            result.failed.append(orphan)
            log.error("Could not remove orphan %s: %s", orphan.describe(now), _reason(e))
            continue
        result.removed.append(orphan)
        log.info("Removed orphan %s", orphan.describe(now))


async def sweep(
    hub: HubClient,
    hosts: Sequence[Mapping[str, Any]],
    *,
    hub_id: str,
    remove: bool = False,
    grace_seconds: float = 300,
    docker_timeout_seconds: float = 30,
    docker_pool_size: int = 4,
    label_filters: Sequence[str] = (),
    log: logging.Logger | None = None,
    reported: set[str] | None = None,
) -> SweepResult:
    """One pass over every engine: list DO-LAB's containers, read the hub, log (and with ``remove`` remove) the
    orphans of hub ``hub_id``.

    ``label_filters`` (``key=value``) narrow the containers further (tests use it to see only their own).
    ``reported`` (container ids) carries from sweep to sweep which containers from before hub ids were logged.
    """
    log = log or logging.getLogger("dolab.reaper")
    result = SweepResult()
    # Containers first, then the hub: every container seen existed before the hub's answer was made.
    containers = await _list_engines(hosts, label_filters, docker_timeout_seconds, docker_pool_size, result, log)
    result.containers = len(containers)
    try:
        users = [user async for user in hub.users(state="active")]
        problem = state_problem(users)
        if problem:
            raise HubAPIError(200, problem)
        now = time.time()
        seen = {(c["engine"], c["id"]): c for c in containers}
        servers = servers_of(users)
        candidates = find_orphans(containers, servers, now, grace_seconds, hub_id)
        confirmed = await asyncio.gather(
            *(_confirm(hub, o, seen[(o.engine, o.id)], now, grace_seconds, hub_id) for o in candidates)
        )
    except HubAPIError as e:
        result.hub_error = str(e)
        log.error("Cannot read the hub's servers, so nothing is reaped this sweep: %s", e)
        return result
    result.others = sum(1 for c in containers if c["labels"].get(HUB_LABEL) != hub_id)
    result.unclaimed = unclaimed(containers, servers)
    _report_unclaimed(result, reported if reported is not None else set(), log)
    result.orphans = [o for o, sure in zip(candidates, confirmed, strict=True) if sure]
    if remove:
        await _remove_orphans(hosts, result, now, docker_timeout_seconds, docker_pool_size, log)
    else:
        for orphan in result.orphans:
            log.info("Orphan %s. Dry run: not removed (--remove removes it)", orphan.describe(now))
    # A quiet sweep is polling (debug); one that found something is worth an info line.
    log.log(
        logging.INFO if result.orphans or result.engines_down else logging.DEBUG,
        "Sweep done: %d DO-LAB container(s) on %d engine(s), %d of another hub or none, %d orphan(s), %d removed%s",
        result.containers,
        len(hosts) - len(result.engines_down),
        result.others,
        len(result.orphans),
        len(result.removed),
        f"; not answering: {', '.join(result.engines_down)}" if result.engines_down else "",
    )
    return result


# ----- configuration ---------------------------------------------------------------------------------------


def parse_docker_hosts(text: str) -> list[dict[str, Any]]:
    """``--docker-hosts`` / ``$DOLAB_DOCKER_HOSTS``: the hub's ``docker_hosts`` as JSON; ValueError with a sentence."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--docker-hosts is not valid JSON ({e})") from None
    return check_docker_hosts(raw)
