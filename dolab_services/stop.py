"""The one way DO-LAB's services stop a server: pre-stop hooks, then the hub API, logged and counted by reason.

The culler uses it for idle, deadline and max_age stops and for an admin's stop from its page; the monitor's quota
enforcer uses it for quota stops. Before a server goes, every pre-stop hook runs in order: an async callable
``hook(user, server, reason)`` (the sync service registers one that saves the workspace,
``dolab_services.sync.hooks:pre_stop_final_sync``). A hook that raises or times out blocks the stop: the server
keeps running, the refusal is logged and counted, and the caller tries again later (the culler at its next sweep,
the monitor at its next tick). Then ``DELETE /users/:u/servers/:s`` (``/users/:u/server`` for the default
server) asks the hub to stop it. Metrics, in the registry the caller passes (a private one by default):

- ``dolab_server_stops_total{reason}``: stops the hub accepted;
- ``dolab_server_stop_blocked_total{reason}``: stops a pre-stop hook refused.

``reason`` is one of :data:`STOP_REASONS`, which keeps the label set bounded.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal
from urllib.parse import quote

from prometheus_client import CollectorRegistry, Counter

from dolab_core.hooks import load_object

from .hubclient import HubAPIError, HubClient

__all__ = ["STOP_REASONS", "PreStopHook", "StopOutcome", "StopPath", "load_hooks"]

#: Why a server may be stopped: the label values of the stop counters.
STOP_REASONS = ("idle", "deadline", "max_age", "quota", "admin")

PreStopHook = Callable[[str, str, str], Awaitable[Any]]
#: ``stopped``: the hub accepted the stop (stopped or stopping); ``gone``: it has no such server;
#: ``blocked``: a pre-stop hook refused; ``failed``: the hub refused or did not answer; ``dry-run``: not asked.
StopOutcome = Literal["stopped", "gone", "blocked", "failed", "dry-run"]


def load_hooks(specs: Iterable[str]) -> list[PreStopHook]:
    """The callables that ``module.path:name`` strings name; ValueError with a sentence for a bad one."""
    return [
        load_object(spec, what="pre-stop hook", kind="callable", malformed="must be written module.path:callable")
        for spec in specs
    ]


def server_path(user: str, server: str) -> str:
    """The hub API path of a user's server (the default server has its own)."""
    base = f"/users/{quote(user, safe='')}"
    return f"{base}/servers/{quote(server, safe='')}" if server else f"{base}/server"


def describe(user: str, server: str) -> str:
    """How log lines name a server: ``alice/gpu``, or ``alice/`` for the default one."""
    return f"{user}/{server}"


class StopPath:
    """Run the pre-stop hooks, then stop the server through the hub; log and count every outcome.

    ``hook_timeout_seconds`` bounds each hook (a stuck one blocks that stop, never the caller for longer).
    With ``dry_run`` nothing runs and nothing is asked of the hub: the stop that would happen is logged.
    """

    def __init__(
        self,
        hub: HubClient,
        hooks: Sequence[PreStopHook] = (),
        *,
        registry: CollectorRegistry | None = None,
        hook_timeout_seconds: float = 600,
        dry_run: bool = False,
        log: logging.Logger | None = None,
    ) -> None:
        self.hub = hub
        self.hooks = list(hooks)
        self.hook_timeout_seconds = hook_timeout_seconds
        self.dry_run = dry_run
        self.log = log or logging.getLogger("dolab.stop")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.stops = Counter(
            "dolab_server_stops_total", "Servers stopped, by reason.", ["reason"], registry=self.registry
        )
        self.blocked = Counter(
            "dolab_server_stop_blocked_total",
            "Stops that a pre-stop hook refused (tried again later), by reason.",
            ["reason"],
            registry=self.registry,
        )
        for reason in STOP_REASONS:  # every series from the start: a 0 is data, a missing series is not
            self.stops.labels(reason=reason)
            self.blocked.labels(reason=reason)

    async def stop(self, user: str, server: str, reason: str, detail: str = "") -> StopOutcome:
        """Stop ``user``'s ``server`` ("" for the default one) for ``reason`` (one of :data:`STOP_REASONS`)."""
        if reason not in STOP_REASONS:
            raise ValueError(f"stop reason {reason!r} is not one of {', '.join(STOP_REASONS)}")
        name = describe(user, server)
        why = f"{reason} ({detail})" if detail else reason
        if self.dry_run:
            self.log.info("Dry run: would stop server %s, reason %s", name, why)
            return "dry-run"
        for hook in self.hooks:
            try:
                result = hook(user, server, reason)
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, self.hook_timeout_seconds)
            except asyncio.TimeoutError:
                return self._blocked(name, reason, hook, f"no answer in {self.hook_timeout_seconds:g} s")
            except Exception as e:
                self.log.debug("Pre-stop hook %s failed for %s", _hook_name(hook), name, exc_info=True)
                return self._blocked(name, reason, hook, str(e) or type(e).__name__)
        try:
            await self.hub.request("DELETE", server_path(user, server))
        except HubAPIError as e:
            if e.status == 404:
                self.log.info("Server %s is already gone (reason was %s)", name, why)
                return "gone"
            self.log.error("Could not stop server %s (reason %s): %s", name, why, e)
            return "failed"
        self.stops.labels(reason=reason).inc()
        self.log.info("Stopped server %s, reason %s", name, why)
        return "stopped"

    def _blocked(self, name: str, reason: str, hook: PreStopHook, error: str) -> StopOutcome:
        self.blocked.labels(reason=reason).inc()
        self.log.warning(
            "Not stopping server %s (reason %s): pre-stop hook %s failed: %s; trying again later",
            name,
            reason,
            _hook_name(hook),
            error[:300],
        )
        return "blocked"


def _hook_name(hook: PreStopHook) -> str:
    return f"{getattr(hook, '__module__', '?')}:{getattr(hook, '__qualname__', repr(hook))}"
