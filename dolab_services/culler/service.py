"""dolab-culler: keep running work alive, stop what is idle or past its time, warn first, let users extend.

Every ``--interval`` seconds a sweep lists the hub's ready servers (one paginated request, with their spawner
state) and, for each, builds :class:`~.policy.ServerFacts`: start, the hub's last activity, the profile, backend
and GPU slots from the state, the user's groups, and the stop time (the user's ``user_options["stop_at"]``, or a
later one the user extended to here). Only servers that :func:`~.policy.needs_inspection` says are near their
idle timeout get their kernels read, and every server holding GPUs gets its GPU use read (one telemetry call per
sweep, cheap). Then :func:`~.policy.decide`:

- running work (a busy kernel, a busy GPU) is recorded as the server's activity in the hub
  (``POST /users/:name/activity``), so the hub, the admin page and other tools agree it is in use;
- a stop coming within the warning window becomes a warning, shown on the service's page and at ``api/warnings``;
- a stop that is due goes through :class:`~.stop.StopPath` (pre-stop hooks, then the hub API).

Kernels are read from the server's own address (``state["server_url"]`` + ``api/kernels?no_track_activity=1``),
never through the proxy: the proxy counts every request as the user's activity, so a culler reading through it
would keep every server alive forever; with ``no_track_activity=1`` jupyter-server does not count it either.

One server failing never holds up the others: each server is handled in its own task (at most ``--concurrency``
read kernels at once, each read with a timeout), a sweep waits at most one interval for them, and a server still
being handled is skipped by the next sweep. A server whose kernels cannot be read (no answer, an error status, no
``server_url`` in its state) is logged and kept from an idle stop: unknown is not idle. Its deadline and maximum
age still apply.

Users extend their stop time on the service's page (a one-click button) or with ``POST api/extend``. JupyterHub
6.1 refuses ``PATCH /users/:u/servers/:s`` while a server is running ("is active. Please stop it before
modifying it"), so an extended stop time cannot go into the running server's ``user_options``: the culler keeps
it in its own file (``--extensions-file``, which survives the hub's restarts of the service), bound to that run
of the server (its ``started`` time); a later start uses the user's options again.

Scopes (role ``dolab-culler``, :data:`CULLER_SCOPES`): ``list:users``, ``read:users:name`` and
``read:users:groups`` (who, and their groups for exemptions), ``read:servers`` and ``admin:server_state`` (the
servers, their activity, options and state), ``users:activity`` (record running work), ``delete:servers`` (stop),
``access:servers`` (read kernels on the servers). Users get ``access:services!service=dolab-culler`` through
``c.JupyterHub.extra_user_scopes`` to open the page.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Bool, Float, Integer, List, Unicode, default
from traitlets.config import Config, LazyConfigValue

from ..app import ServiceApp
from ..hubclient import HubAPIError, HubClient
from .policy import CullPolicy, Decision, ServerFacts, decide, needs_inspection
from .stop import StopPath, describe, load_hooks
from .telemetry import TelemetrySource, load_telemetry

__all__ = [
    "CULLER_SCOPES",
    "SERVICE_NAME",
    "USER_SCOPE",
    "CullWarning",
    "Culler",
    "ExtensionStore",
    "InspectionError",
    "ServerView",
    "SweepReport",
    "Sweeper",
    "culler_service",
    "extended_stop_at",
    "format_time",
    "main",
    "parse_time",
    "read_busy_kernels",
    "server_facts",
]

SERVICE_NAME = "dolab-culler"
#: What the culler's token needs, and what the shipped config's ``dolab-culler`` role grants.
CULLER_SCOPES = (
    "list:users",
    "read:users:name",
    "read:users:groups",
    "read:servers",
    "admin:server_state",
    "users:activity",
    "delete:servers",
    "access:servers",
)
#: What every user needs to open the culler's page and API.
USER_SCOPE = f"access:services!service={SERVICE_NAME}"
DEFAULT_PORT = 10101


# ----- times -----------------------------------------------------------------------------------------------


def parse_time(value: Any) -> datetime | None:
    """A hub or user_options timestamp (ISO 8601, ``Z`` or an offset; naive means UTC) as an aware datetime."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def format_time(when: datetime) -> str:
    """A stop time as users and ``user_options`` write it: UTC, whole seconds, with a ``Z``."""
    return when.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _hub_time(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _label(server: str) -> str:
    """A server as a sentence names it."""
    return f"server '{server}'" if server else "default server"


# ----- facts -----------------------------------------------------------------------------------------------


def server_facts(
    user: Mapping[str, Any], name: str, server: Mapping[str, Any], now: datetime, stop_at: datetime | None = None
) -> ServerFacts:
    """The policy's view of one server of a hub user model (``servers[name]``, with ``state`` when readable).

    ``stop_at``, when given, is a stop time the user extended to here; otherwise ``user_options["stop_at"]``.
    """
    state = server.get("state") or {}
    options = server.get("user_options") or {}
    started = parse_time(server.get("started")) or parse_time(server.get("last_activity")) or now
    groups = user.get("groups") or ()
    return ServerFacts(
        user=str(user.get("name", "")),
        server=name,
        started=started,
        last_activity=parse_time(server.get("last_activity")),
        profile=str(state.get("profile") or options.get("profile") or ""),
        backend=str(state.get("backend") or ""),
        gpus=len(_slots(server)),
        groups=tuple(str(g) for g in groups),
        stop_at=stop_at or parse_time(options.get("stop_at")),
    )


def _slots(server: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    slots = (server.get("state") or {}).get("slots")
    return [s for s in slots if isinstance(s, Mapping)] if isinstance(slots, list) else []


class InspectionError(Exception):
    """A server's kernels could not be read; the message says why, in a few words."""


async def read_busy_kernels(http: AsyncHTTPClient, server_url: str, token: str, timeout_seconds: float) -> int:
    """How many kernels of the server at ``server_url`` (its own address, base URL included) are executing.

    Reads ``api/kernels?no_track_activity=1`` with ``token``, directly, not through the proxy. Raises
    :class:`InspectionError` on no answer, an error status or an answer that is not a kernel list.
    """
    if not server_url:
        raise InspectionError("its state has no server_url")
    url = server_url.rstrip("/") + "/api/kernels?no_track_activity=1"
    request = HTTPRequest(
        url,
        headers={"Authorization": f"token {token}", "Accept": "application/json"},
        connect_timeout=min(timeout_seconds, 5),
        request_timeout=timeout_seconds,
        follow_redirects=False,  # a redirect would carry the token elsewhere
    )
    try:
        response = await asyncio.wait_for(http.fetch(request, raise_error=False), timeout_seconds + 1)
    except (asyncio.TimeoutError, HTTPClientError):
        raise InspectionError(f"no answer in {timeout_seconds:g} s") from None
    except OSError as e:
        raise InspectionError(f"no answer ({e.strerror or e})") from None
    if response.code == 599:
        error = response.error
        reason = f"no answer in {timeout_seconds:g} s" if "Timeout" in str(error) else f"no answer ({error})"
        raise InspectionError(reason)
    if response.code != 200:
        raise InspectionError(f"HTTP {response.code} from api/kernels")
    try:
        kernels = json.loads(response.body or b"")
    except ValueError:
        raise InspectionError("api/kernels did not answer JSON") from None
    if not isinstance(kernels, list):
        raise InspectionError("api/kernels did not answer a list")
    return sum(1 for k in kernels if isinstance(k, Mapping) and k.get("execution_state") == "busy")


# ----- warnings and extensions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CullWarning:
    """A stop the culler foresees for a server: why and when."""

    user: str
    server: str
    reason: str
    stop_at: datetime
    detail: str = ""

    def message(self) -> str:
        """What the user reads."""
        when = format_time(self.stop_at)
        what = f"Your {_label(self.server)}"
        if self.reason == "deadline":
            return f"{what} stops at {when}, the stop time you chose. Extend it if your work needs longer."
        if self.reason == "idle":
            return f"{what} has been idle and stops at {when} unless you use it or choose to keep it running."
        if self.reason == "max_age":
            return f"{what} stops at {when}: it has run as long as its profile allows. Save your work."
        return f"{what} stops at {when} ({self.reason})."

    def to_json(self) -> dict[str, Any]:
        """The ``api/warnings`` form."""
        return {
            "server": self.server,
            "reason": self.reason,
            "stop_at": format_time(self.stop_at),
            "message": self.message(),
        }


class ExtensionStore:
    """The stop times users extended to, per server run, kept in a JSON file (or in memory without one).

    An entry holds for the run of the server that started at ``started`` (the hub's timestamp), so a later start
    of the same server does not inherit it. The file is replaced atomically on every change.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, log: logging.Logger | None = None) -> None:
        self.path = Path(path) if path else None
        self.log = log or logging.getLogger("dolab.culler")
        self._entries: dict[str, dict[str, str]] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self._entries = {
                    str(k): {"started": str(v["started"]), "stop_at": str(v["stop_at"])}
                    for k, v in data.items()
                    if isinstance(v, Mapping) and "started" in v and "stop_at" in v
                }
            except (OSError, ValueError, AttributeError) as e:
                self.log.error("Cannot read the extended stop times in %s (%s): starting without them", self.path, e)

    def get(self, user: str, server: str, started: str) -> datetime | None:
        """The extended stop time of this run of the server, if the user extended it."""
        entry = self._entries.get(describe(user, server))
        return parse_time(entry["stop_at"]) if entry and entry["started"] == started else None

    def set(self, user: str, server: str, started: str, stop_at: datetime) -> None:
        """Record an extension of this run of the server."""
        self._entries[describe(user, server)] = {"started": started, "stop_at": format_time(stop_at)}
        self._save()

    def prune(self, running: Collection[tuple[str, str, str]]) -> None:
        """Forget extensions of server runs not among ``running`` ``(user, server, started)``."""
        keep = {describe(u, s): started for u, s, started in running}
        gone = [k for k, v in self._entries.items() if keep.get(k) != v["started"]]
        for key in gone:
            del self._entries[key]
        if gone:
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps(self._entries, indent=1, sort_keys=True), encoding="utf-8")
            temporary.replace(self.path)
        except OSError as e:
            self.log.error("Cannot save the extended stop times to %s (%s)", self.path, e)


def extended_stop_at(current: datetime | None, hours: Any, now: datetime, max_run_hours: float) -> datetime:
    """``current`` moved ``hours`` later, within ``max_run_hours`` from ``now`` (0: no limit).

    Raises ValueError with a sentence the user reads.
    """
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not math.isfinite(hours) or hours <= 0:
        raise ValueError(f"hours must be a positive number of hours, not {hours!r}.")
    if current is None:
        raise ValueError("This server has no stop time to extend: it runs until it is idle.")
    try:
        new = max(current, now) + timedelta(hours=hours)
    except OverflowError:
        raise ValueError(f"{hours:g} hours is too far ahead.") from None
    if max_run_hours > 0 and new > now + timedelta(hours=max_run_hours):
        latest = now + timedelta(hours=max_run_hours)
        headroom = max(0.0, (latest - max(current, now)).total_seconds() / 3600)
        raise ValueError(
            f"You can extend to at most {max_run_hours:g} hours from now ({format_time(latest)}); "
            f"that is {math.floor(headroom * 100) / 100:g} more hours at most, not {hours:g}."
        )
    return new


# ----- the sweep -------------------------------------------------------------------------------------------


@dataclass
class SweepReport:
    """What one sweep saw and did."""

    servers: int = 0
    inspected: int = 0
    unreadable: int = 0
    active: int = 0
    warned: int = 0
    stopped: int = 0
    skipped: int = 0
    unfinished: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ServerView:
    """One of a user's running servers as the page shows it."""

    name: str
    profile: str
    started: datetime
    stop_at: datetime | None
    warning: CullWarning | None
    #: How many hours the stop time can still move (None: no stop time, so nothing to extend).
    headroom_hours: float | None = None

    @property
    def label(self) -> str:
        """The server's name for the page."""
        return f"Server '{self.name}'" if self.name else "Default server"


@dataclass
class _Run:
    """A server of the current sweep: its hub model and facts."""

    name: str
    model: Mapping[str, Any]
    facts: ServerFacts


class Sweeper:
    """The culler's work, independent of how it is run: sweeps, warnings, extensions, keep-alives."""

    def __init__(
        self,
        hub: HubClient,
        policy: CullPolicy,
        telemetry: TelemetrySource,
        stop_path: StopPath,
        token: str,
        *,
        concurrency: int = 10,
        kernel_timeout_seconds: float = 10,
        telemetry_timeout_seconds: float = 10,
        max_run_hours: float = 168,
        extensions: ExtensionStore | None = None,
        dry_run: bool = False,
        log: logging.Logger | None = None,
    ) -> None:
        self.hub = hub
        self.policy = policy
        self.telemetry = telemetry
        self.stop_path = stop_path
        self.kernel_timeout_seconds = kernel_timeout_seconds
        self.telemetry_timeout_seconds = telemetry_timeout_seconds
        self.max_run_hours = max_run_hours
        self.extensions = extensions or ExtensionStore()
        self.dry_run = dry_run
        self.log = log or logging.getLogger("dolab.culler")
        self._token = token
        self.concurrency = concurrency
        self._semaphore = asyncio.Semaphore(concurrency)
        self._http: AsyncHTTPClient | None = None
        self._in_flight: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._warnings: dict[tuple[str, str], CullWarning] = {}
        self._problems: dict[tuple[str, str], str] = {}

    def close(self) -> None:
        """Close the connections to the servers."""
        if self._http is not None:
            self._http.close()
            self._http = None

    # ----- one sweep -----

    async def sweep(self, wait_seconds: float | None = None) -> SweepReport:
        """List the ready servers and handle each; wait for them at most ``wait_seconds`` (None: until done).

        Raises :class:`HubAPIError` when the hub's server list cannot be read (nothing is done then).
        """
        started = time.monotonic()
        report = SweepReport()
        users = [user async for user in self.hub.users(state="ready")]
        now = _utcnow()
        runs: list[_Run] = []
        listed: set[tuple[str, str, str]] = set()
        for user in users:
            for name, model in (user.get("servers") or {}).items():
                if not isinstance(model, Mapping):
                    continue
                listed.add((str(user.get("name", "")), name, str(model.get("started") or "")))
                if not model.get("ready") or model.get("pending"):
                    continue
                if "state" not in model:
                    self._log_once(
                        ("", ""),
                        "The hub lists servers without their state: the token needs "
                        "admin:server_state (their kernels and GPUs cannot be read)",
                    )
                extended = self.extensions.get(str(user.get("name", "")), name, str(model.get("started") or ""))
                facts = server_facts(user, name, model, now, extended)
                runs.append(_Run(name, model, facts))
        report.servers = len(runs)
        present = {(u, s) for u, s, _ in listed}
        self._warnings = {k: w for k, w in self._warnings.items() if k in present}
        self._problems = {k: p for k, p in self._problems.items() if k in present or k == ("", "")}
        self.extensions.prune(listed)
        await self._read_gpus(runs)
        tasks = []
        for run in runs:
            key = (run.facts.user, run.name)
            if key in self._in_flight:
                report.skipped += 1
                self.log.debug("Server %s is still being handled since an earlier sweep", describe(*key))
                continue
            self._in_flight.add(key)
            task = asyncio.create_task(self._handle(run, report))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            tasks.append(task)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=wait_seconds)
            report.unfinished = len(pending)
        report.seconds = time.monotonic() - started
        self.log.log(
            logging.INFO if report.stopped else logging.DEBUG,
            "Sweep: %d server(s), %d inspected, %d unreadable, %d active, %d warned, %d stopped, %d still running "
            "from an earlier sweep, %d not finished (%.2f s)",
            report.servers,
            report.inspected,
            report.unreadable,
            report.active,
            report.warned,
            report.stopped,
            report.skipped,
            report.unfinished,
            report.seconds,
        )
        return report

    async def _read_gpus(self, runs: Sequence[_Run]) -> None:
        """One telemetry call for every GPU of every server; each server gets the highest use of its GPUs."""
        slots = [slot for run in runs for slot in _slots(run.model)]
        if not slots:
            return
        try:
            readings = await asyncio.wait_for(self.telemetry.gpu_percent(slots), self.telemetry_timeout_seconds)
        except Exception as e:
            text = "no answer in time" if isinstance(e, asyncio.TimeoutError) else str(e) or type(e).__name__
            self.log.warning("Cannot read GPU use (%s): deciding on kernels alone this sweep", text)
            return
        for run in runs:
            found = [readings[s["uuid"]] for s in _slots(run.model) if s.get("uuid") in readings]
            if found:
                run.facts = replace(run.facts, gpu_percent=max(found))

    async def _handle(self, run: _Run, report: SweepReport) -> None:
        key = (run.facts.user, run.name)
        name = describe(*key)
        try:
            facts, unknown = run.facts, ""
            if needs_inspection(facts, self.policy, _utcnow()):
                report.inspected += 1
                try:
                    async with self._semaphore:
                        busy = await read_busy_kernels(
                            self._client(),
                            str((run.model.get("state") or {}).get("server_url") or ""),
                            self._token,
                            self.kernel_timeout_seconds,
                        )
                except InspectionError as e:
                    unknown = str(e)
                    report.unreadable += 1
                    self._log_once(key, f"Cannot read the kernels of server {name} ({e}): kept from an idle stop")
                else:
                    facts = replace(facts, busy_kernels=busy)
                    self._problems.pop(key, None)
            now = _utcnow()
            decision = decide(facts, self.policy, now)
            if decision.active:
                report.active += 1
                await self.record_activity(facts.user, facts.server, now, decision.detail)
            if decision.action == "stop" and decision.reason == "idle" and unknown:
                return  # unknown is not idle: keep it, and keep any warning it had
            if decision.action == "warn":
                report.warned += 1
                self._warn(facts, decision)
            elif decision.action == "stop":
                outcome = await self.stop_path.stop(facts.user, facts.server, decision.reason, _detail(facts, decision))
                if outcome == "stopped":
                    report.stopped += 1
                if outcome in ("stopped", "gone"):
                    self._warnings.pop(key, None)
            else:
                self._warnings.pop(key, None)
        except Exception:
            self.log.exception("Handling server %s failed; the others go on", name)
        finally:
            self._in_flight.discard(key)

    def _warn(self, facts: ServerFacts, decision: Decision) -> None:
        key = (facts.user, facts.server)
        assert decision.stop_at is not None
        warning = CullWarning(facts.user, facts.server, decision.reason, decision.stop_at, decision.detail)
        previous = self._warnings.get(key)
        self._warnings[key] = warning
        if previous is None or (previous.reason, previous.stop_at) != (warning.reason, warning.stop_at):
            self.log.info(
                "Warning: server %s stops at %s, reason %s",
                describe(*key),
                format_time(warning.stop_at),
                warning.reason,
            )

    def _log_once(self, key: tuple[str, str], message: str) -> None:
        """A problem as a warning when it is new for ``key``, as debug while it lasts."""
        if self._problems.get(key) != message:
            self._problems[key] = message
            self.log.warning("%s", message)
        else:
            self.log.debug("%s", message)

    def _client(self) -> AsyncHTTPClient:
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True, max_clients=max(10, self.concurrency))
        return self._http

    # ----- what users and admins ask -----

    async def record_activity(self, user: str, server: str, when: datetime, detail: str = "") -> None:
        """Tell the hub the server is in use now (a failure is logged: the next sweep tries again)."""
        if self.dry_run:
            self.log.info("Dry run: would record activity of server %s (%s)", describe(user, server), detail)
            return
        stamp = _hub_time(when)
        body = {"servers": {server: {"last_activity": stamp}}, "last_activity": stamp}
        try:
            await self.hub.request("POST", f"/users/{quote(user, safe='')}/activity", body)
        except HubAPIError as e:
            self.log.warning("Could not record the activity of server %s: %s", describe(user, server), e)
        else:
            self.log.debug("Recorded activity of server %s (%s)", describe(user, server), detail or "user")

    def warnings_for(self, user: str) -> list[CullWarning]:
        """The user's current warnings, soonest first."""
        return sorted((w for (u, _), w in self._warnings.items() if u == user), key=lambda w: w.stop_at)

    async def _running_server(self, user: str, server: str) -> Mapping[str, Any]:
        try:
            model = await self.hub.request("GET", f"/users/{quote(user, safe='')}")
        except HubAPIError as e:
            if e.status == 404:
                raise ValueError(f"You have no running {_label(server)}.") from None
            raise
        found = ((model or {}).get("servers") or {}).get(server)
        if not isinstance(found, Mapping) or not found.get("ready") or found.get("pending"):
            raise ValueError(f"You have no running {_label(server)}.")
        return found

    def _stop_at(self, user: str, server: str, model: Mapping[str, Any]) -> datetime | None:
        extended = self.extensions.get(user, server, str(model.get("started") or ""))
        return extended or parse_time((model.get("user_options") or {}).get("stop_at"))

    async def extend(self, user: str, server: str, hours: Any) -> datetime:
        """Move the server's stop time ``hours`` later; the new stop time. ValueError: a sentence for the user."""
        model = await self._running_server(user, server)
        now = _utcnow()
        new = extended_stop_at(self._stop_at(user, server, model), hours, now, self.max_run_hours)
        self.extensions.set(user, server, str(model.get("started") or ""), new)
        if (warning := self._warnings.get((user, server))) and warning.reason == "deadline":
            del self._warnings[(user, server)]
        self.log.info("User %s extended server %s to %s", user, describe(user, server), format_time(new))
        return new

    async def keep_alive(self, user: str, server: str) -> None:
        """The user says an idle server is still wanted: record activity now. ValueError: a sentence."""
        await self._running_server(user, server)
        await self.record_activity(user, server, _utcnow(), "the user asked to keep it")
        if (warning := self._warnings.get((user, server))) and warning.reason == "idle":
            del self._warnings[(user, server)]

    async def servers_of(self, user: str) -> list[ServerView]:
        """The user's running servers, with stop time, warning and how far the stop time can move."""
        model = await self.hub.request("GET", f"/users/{quote(user, safe='')}")
        now = _utcnow()
        views = []
        for name, server in sorted(((model or {}).get("servers") or {}).items()):
            if not isinstance(server, Mapping) or not server.get("ready"):
                continue
            stop_at = self._stop_at(user, name, server)
            headroom = None
            if stop_at is not None:
                latest = now + timedelta(hours=self.max_run_hours) if self.max_run_hours > 0 else None
                headroom = (latest - max(stop_at, now)).total_seconds() / 3600 if latest else math.inf
            views.append(
                ServerView(
                    name=name,
                    profile=str((server.get("user_options") or {}).get("profile") or ""),
                    started=parse_time(server.get("started")) or now,
                    stop_at=stop_at,
                    warning=self._warnings.get((user, name)),
                    headroom_hours=headroom,
                )
            )
        return views


def _detail(facts: ServerFacts, decision: Decision) -> str:
    if decision.reason == "idle":
        last = facts.last_activity or facts.started
        return f"no activity since {format_time(last)}"
    if decision.reason == "deadline" and facts.stop_at is not None:
        return f"stop time {format_time(facts.stop_at)}" + (f"; was busy: {decision.detail}" if decision.detail else "")
    if decision.reason == "max_age":
        return f"started {format_time(facts.started)}"
    return decision.detail


# ----- registration in jupyterhub_config.py ----------------------------------------------------------------


def _config_value(config: Config, section: str, key: str, default: Any) -> Any:
    if section not in config or key not in config[section]:
        return default
    value = config[section][key]
    return value.get_value(default) if isinstance(value, LazyConfigValue) else value


def _env_number(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {text!r}")
    return value


@dataclass(frozen=True)
class CullerRegistration:
    """What the shipped config adds: the service, its role, and the user scopes with access to its page."""

    service: dict[str, Any]
    role: dict[str, Any]
    extra_user_scopes: set[str]


def culler_service(
    config: Config, env: Mapping[str, str], python: str = sys.executable, data_dir: str | os.PathLike[str] = ""
) -> CullerRegistration | None:
    """The hub-managed ``dolab-culler`` service, its role, and ``extra_user_scopes`` with :data:`USER_SCOPE`.

    From ``DOLAB_CULLER_INTERVAL`` (seconds), ``DOLAB_CULLER_POLICY`` (a JSON file, checked now),
    ``DOLAB_CULLER_TELEMETRY`` and ``DOLAB_CULLER_PORT`` (default 10101); the extension limit is the
    spawner's ``max_run_hours``. None when the config already has a service of that name. Raises ValueError with
    a sentence for bad settings.
    """
    services = _config_value(config, "JupyterHub", "services", [])
    if any(isinstance(s, Mapping) and s.get("name") == SERVICE_NAME for s in services):
        return None
    interval = _env_number(env, "DOLAB_CULLER_INTERVAL", 60)
    if interval <= 0:
        raise ValueError(f"DOLAB_CULLER_INTERVAL must be a positive number of seconds, not {interval:g}")
    port = _env_number(env, "DOLAB_CULLER_PORT", DEFAULT_PORT)
    if port != int(port) or not 0 < port < 65536:
        raise ValueError(f"DOLAB_CULLER_PORT must be a TCP port number, not {env.get('DOLAB_CULLER_PORT')!r}")
    default_hours = _env_number(env, "DOLAB_MAX_RUN_HOURS", 168)
    max_run_hours = float(_config_value(config, "DoLabSpawner", "max_run_hours", default_hours))
    command = [python, "-m", "dolab_services.culler", "--interval", f"{interval:g}"]
    command += ["--max-run-hours", f"{max_run_hours:g}"]
    policy = env.get("DOLAB_CULLER_POLICY", "")
    if policy:
        load_policy(policy)
        command += ["--policy", str(Path(policy).resolve())]
    telemetry = env.get("DOLAB_CULLER_TELEMETRY", "").strip()
    if telemetry:
        command += ["--telemetry", telemetry]
    if data_dir:
        command += ["--extensions-file", str(Path(data_dir) / "culler-extensions.json")]
    service = {
        "name": SERVICE_NAME,
        "command": command,
        "url": f"http://127.0.0.1:{int(port)}",
        "oauth_no_confirm": True,
        "info": {"description": "Your servers' stop times and warnings; extend a stop time"},
    }
    role = {
        "name": SERVICE_NAME,
        "description": "Keep running work alive, stop idle or expired servers (dolab-culler)",
        "scopes": list(CULLER_SCOPES),
        "services": [SERVICE_NAME],
    }
    scopes = set(_config_value(config, "JupyterHub", "extra_user_scopes", set()) or ()) | {USER_SCOPE}
    return CullerRegistration(service, role, scopes)


def load_policy(path: str) -> CullPolicy:
    """The policy in a JSON file (:meth:`CullPolicy.from_config`); ValueError with a sentence."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"Cannot read the culler policy {path} ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"The culler policy {path} is not valid JSON ({e})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"The culler policy {path} must be a JSON object")
    return CullPolicy.from_config(data)


# ----- the service -----------------------------------------------------------------------------------------


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
            return _env_number(os.environ, "DOLAB_MAX_RUN_HOURS", 168)
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
        return policy, HubClient()

    def start(self) -> None:
        """Check the settings, then sweep and serve until stopped (or sweep once)."""
        try:
            policy, hub = self._check()
            hooks = load_hooks(self.pre_stop_hooks)
            telemetry = load_telemetry(self.telemetry)
        except ValueError as e:
            print(f"{SERVICE_NAME}: {e}", file=sys.stderr)
            self.exit(2)
        # The telemetry sources log under the package's name: through the same handler, in the same format.
        package_log = logging.getLogger("dolab_services")
        package_log.setLevel(self.log.level)
        for handler in self.log.handlers:
            package_log.addHandler(handler)
        self.log.info(
            "Sweeping every %g s%s; policy %s; GPU use from %s; %d pre-stop hook(s)",
            self.interval_seconds,
            " (dry run)" if self.dry_run else "",
            self.policy_file or "built-in",
            self.telemetry,
            len(hooks),
        )
        self.exit(asyncio.run(self._run(policy, hub, hooks, telemetry)))

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
            os.environ.get("JUPYTERHUB_API_TOKEN", ""),
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
            service_url = os.environ.get("JUPYTERHUB_SERVICE_URL", "")
            if service_url:
                where = urlsplit(service_url)
                prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{SERVICE_NAME}/")
                app = make_app(sweeper, prefix, extend_hours=self.extend_hours, log=self.log)
                try:
                    server = app.listen(where.port or 80, where.hostname or "127.0.0.1", xheaders=True)
                except OSError as e:
                    # Culling is the part that protects the machine: it goes on without the page.
                    self.log.error(
                        "Cannot listen on %s (%s): the page and API are off, culling goes on. Is another "
                        "service on that port? Set DOLAB_CULLER_PORT.",
                        service_url,
                        e.strerror or e,
                    )
                else:
                    self.log.info("Page and API at %s (listening on %s)", prefix, service_url)
            else:
                self.log.warning("No JUPYTERHUB_SERVICE_URL: sweeping without the page and API")
            while True:
                began = time.monotonic()
                try:
                    await sweeper.sweep(wait_seconds=self.interval_seconds)
                except HubAPIError as e:
                    self.log.error("Cannot list the hub's servers, so nothing is done this sweep: %s", e)
                except Exception:  # a bug in one sweep must not end the service
                    self.log.exception("The sweep failed; trying again in %g s", self.interval_seconds)
                await asyncio.sleep(max(0.0, self.interval_seconds - (time.monotonic() - began)))
        finally:
            if server is not None:
                server.stop()
            sweeper.close()
            hub.close()
            await telemetry.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dolab_services.culler``."""
    app = Culler()
    app.initialize(list(argv) if argv is not None else None)
    app.start()
