"""The culler's work, independent of how it is run: sweeps, warnings, extensions, keep-alives (:class:`Sweeper`).

A sweep lists the hub's ready servers (one paginated request, with their spawner state) and builds each one's
facts; only servers near their idle timeout get their kernels read, and every GPU server's GPU use is read in one
telemetry call. Then the policy decides: running work is recorded as activity, a stop within the warning window
becomes a warning, a due stop goes through the :class:`~dolab_services.stop.StopPath`. Each server is handled in its
own task (at most ``concurrency`` kernel reads at once), a sweep waits at most ``wait_seconds`` for them, and a
server still being handled is skipped by the next sweep; a server whose kernels cannot be read is kept from an
idle stop.

Kernels are read with a token the hub mints for that one server (:class:`~dolab_services.servertokens.ServerTokens`),
never with the culler's own: a user controls her server and can record whatever it is sent."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient

from dolab_core.serverstate import ServerState
from dolab_core.times import format_time, hub_time, parse_time, utcnow

from ..hubclient import HubAPIError, HubClient
from ..servertokens import ServerTokens
from ..stop import StopPath, describe
from .extensions import ExtensionStore, extended_stop_at, headroom_hours
from .facts import MAX_KERNELS_BODY_BYTES, InspectionError, read_busy_kernels, server_facts
from .notices import CullWarning, ServerView, server_label
from .policy import CullPolicy, Decision, ServerFacts, decide, needs_inspection
from .telemetry import TelemetrySource

__all__ = ["SweepReport", "Sweeper"]


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


@dataclass
class _Run:
    """A server of the current sweep: its hub model, its spawner state and facts."""

    name: str
    model: Mapping[str, Any]
    state: ServerState
    facts: ServerFacts


class Sweeper:
    """The culler's work, independent of how it is run: sweeps, warnings, extensions, keep-alives."""

    def __init__(
        self,
        hub: HubClient,
        policy: CullPolicy,
        telemetry: TelemetrySource,
        stop_path: StopPath,
        server_tokens: ServerTokens,
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
        self.server_tokens = server_tokens
        self.concurrency = concurrency
        self._semaphore = asyncio.Semaphore(concurrency)
        self._http: AsyncHTTPClient | None = None
        self._in_flight: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._warnings: dict[tuple[str, str], CullWarning] = {}
        self._problems: dict[tuple[str, str], str] = {}
        self._groups: dict[str, tuple[str, ...]] = {}  # each user's groups, as last seen (for plan limits)

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
        runs, listed = self._runs_of(users, utcnow())
        report.servers = len(runs)
        present = {(u, s) for u, s, _ in listed}
        self._warnings = {k: w for k, w in self._warnings.items() if k in present}
        self._problems = {k: p for k, p in self._problems.items() if k in present or k == ("", "")}
        self.extensions.prune(listed)
        await self.server_tokens.prune(present)
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

    def _runs_of(
        self, users: Sequence[Mapping[str, Any]], now: datetime
    ) -> tuple[list[_Run], set[tuple[str, str, str]]]:
        """The ready servers of the hub's ``users`` models with their facts, and every server listed as
        ``(user, server, started)`` (a server gone from the list loses its warnings, extensions and token)."""
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
                self._groups[facts.user] = facts.groups
                runs.append(_Run(name, model, ServerState.of(model), facts))
        return runs, listed

    async def _read_gpus(self, runs: Sequence[_Run]) -> None:
        """One telemetry call for every GPU of every server; each server gets the highest use of its GPUs."""
        slots = [slot for run in runs for slot in run.state.slots]
        if not slots:
            return
        try:
            readings = await asyncio.wait_for(self.telemetry.gpu_percent(slots), self.telemetry_timeout_seconds)
        except Exception as e:
            text = "no answer in time" if isinstance(e, asyncio.TimeoutError) else str(e) or type(e).__name__
            self.log.warning("Cannot read GPU use (%s): deciding on kernels alone this sweep", text)
            return
        for run in runs:
            found = [readings[s["uuid"]] for s in run.state.slots if s.get("uuid") in readings]
            if found:
                run.facts = replace(run.facts, gpu_percent=max(found))

    async def _handle(self, run: _Run, report: SweepReport) -> None:
        key = (run.facts.user, run.name)
        name = describe(*key)
        try:
            facts, unknown = run.facts, ""
            if needs_inspection(facts, self.policy, utcnow()):
                report.inspected += 1
                try:
                    async with self._semaphore:
                        busy = await self._read_kernels(run)
                except InspectionError as e:
                    unknown = str(e)
                    report.unreadable += 1
                    self._log_once(key, f"Cannot read the kernels of server {name} ({e}): kept from an idle stop")
                else:
                    facts = replace(facts, busy_kernels=busy)
                    self._problems.pop(key, None)
            now = utcnow()
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

    async def _read_kernels(self, run: _Run) -> int:
        """How many of the server's kernels are busy, read with a token for that server alone."""
        user, server = run.facts.user, run.name
        url = run.state.server_url
        if not url:
            raise InspectionError("its state has no server_url")
        try:
            return await self.server_tokens.use(
                user,
                server,
                lambda token: read_busy_kernels(self._client(), url, token, self.kernel_timeout_seconds),
                lambda e: isinstance(e, InspectionError) and e.refused,
                valid_for_seconds=self.kernel_timeout_seconds + 60,
            )
        except HubAPIError as e:
            raise InspectionError(f"the hub gave no token for it: {e}") from None

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
            self._http = AsyncHTTPClient(
                force_instance=True, max_clients=max(10, self.concurrency), max_body_size=MAX_KERNELS_BODY_BYTES
            )
        return self._http

    # ----- what users and admins ask -----

    async def record_activity(self, user: str, server: str, when: datetime, detail: str = "") -> None:
        """Tell the hub the server is in use now (a failure is logged: the next sweep tries again)."""
        if self.dry_run:
            self.log.info("Dry run: would record activity of server %s (%s)", describe(user, server), detail)
            return
        stamp = hub_time(when)
        body = {"servers": {server: {"last_activity": stamp}}, "last_activity": stamp}
        try:
            await self.hub.request("POST", f"/users/{quote(user, safe='')}/activity", body)
        except HubAPIError as e:
            self.log.warning("Could not record the activity of server %s: %s", describe(user, server), e)
        else:
            self.log.debug("Recorded activity of server %s (%s)", describe(user, server), detail or "user")

    def max_run_hours_for(self, user: str) -> float:
        """How far ahead ``user`` may move a stop time: the hub's limit, lowered by their plan's (0: no limit)."""
        return self.policy.max_run_hours(self._groups.get(user, ()), self.max_run_hours)

    def _remember_groups(self, user: str, model: Mapping[str, Any] | None) -> None:
        if model is not None and "groups" in model:
            self._groups[user] = tuple(str(g) for g in model.get("groups") or ())

    def warnings_for(self, user: str) -> list[CullWarning]:
        """The user's current warnings, soonest first."""
        return sorted((w for (u, _), w in self._warnings.items() if u == user), key=lambda w: w.stop_at)

    async def _running_server(self, user: str, server: str) -> Mapping[str, Any]:
        try:
            model = await self.hub.request("GET", f"/users/{quote(user, safe='')}")
            self._remember_groups(user, model)
        except HubAPIError as e:
            if e.status == 404:
                raise ValueError(f"You have no running {server_label(server)}.") from None
            raise
        found = ((model or {}).get("servers") or {}).get(server)
        if not isinstance(found, Mapping) or not found.get("ready") or found.get("pending"):
            raise ValueError(f"You have no running {server_label(server)}.")
        return found

    def _stop_at(self, user: str, server: str, model: Mapping[str, Any]) -> datetime | None:
        extended = self.extensions.get(user, server, str(model.get("started") or ""))
        return extended or ServerState.of(model).stop_time

    async def extend(self, user: str, server: str, hours: Any) -> datetime:
        """Move the server's stop time ``hours`` later; the new stop time. ValueError: a sentence for the user."""
        model = await self._running_server(user, server)
        now = utcnow()
        new = extended_stop_at(self._stop_at(user, server, model), hours, now, self.max_run_hours_for(user))
        self.extensions.set(user, server, str(model.get("started") or ""), new)
        if (warning := self._warnings.get((user, server))) and warning.reason == "deadline":
            del self._warnings[(user, server)]
        self.log.info("User %s extended server %s to %s", user, describe(user, server), format_time(new))
        return new

    async def keep_alive(self, user: str, server: str) -> None:
        """The user says an idle server is still wanted: record activity now. ValueError: a sentence."""
        await self._running_server(user, server)
        await self.record_activity(user, server, utcnow(), "the user asked to keep it")
        if (warning := self._warnings.get((user, server))) and warning.reason == "idle":
            del self._warnings[(user, server)]

    async def servers_of(self, user: str) -> list[ServerView]:
        """The user's running servers, with stop time, warning and how far the stop time can move."""
        model = await self.hub.request("GET", f"/users/{quote(user, safe='')}")
        self._remember_groups(user, model)
        now = utcnow()
        views = []
        for name, server in sorted(((model or {}).get("servers") or {}).items()):
            if not isinstance(server, Mapping) or not server.get("ready"):
                continue
            stop_at = self._stop_at(user, name, server)
            headroom = headroom_hours(stop_at, now, self.max_run_hours_for(user))
            views.append(
                ServerView(
                    name=name,
                    profile=ServerState.of(server).profile,
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
