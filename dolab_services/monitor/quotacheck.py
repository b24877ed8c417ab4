"""The spawner's quota check: ``c.DoLabSpawner.quota_check = MonitorQuotaCheck(url, token)``.

It runs in the hub process, in :meth:`DoLabSpawner.check_quota`, before any GPU slot or pod is taken. For a
*metered* selection (a profile with GPUs, or any RunPod profile: those cost GPU-hours or money) it asks the monitor
service ``GET {url}api/quota/<user>`` directly at the service's own address (not through the proxy) with the
monitor's service token and a short timeout (``timeout_seconds``, default 3 s). CPU profiles on local or Docker
hosts cost nothing a quota counts, so they start even when the quota is used up.

- The monitor says no: the spawn is refused with ``SpawnException`` (HTTP 403, reason ``quota``) and the
  monitor's sentence: what was used of which limit and when the user can start a GPU server again.
- The monitor is down, slow or answers an error: by default the spawn goes on (``fail_closed=False``) and the
  hub logs a warning. Nothing is lost that way: the ledger books every running server from its start time when
  the monitor is back, and its run-time check stops the server then if the quota is used up. With
  ``fail_closed=True`` (``DOLAB_MONITOR_FAIL_CLOSED=1``) the spawn is refused instead, with a sentence asking
  the user to try again in a minute (for budgets that must never be overrun, at the cost of no GPU spawns while
  the monitor is down).

The shipped config registers it when quotas are configured (``DOLAB_MONITOR_QUOTAS`` or ``..._FILE``).
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

__all__ = ["MonitorQuotaCheck", "is_metered"]

log = logging.getLogger(__name__)


def is_metered(selection: Any) -> bool:
    """Whether a spawner selection uses what quotas count: GPUs, or a paid backend (RunPod)."""
    return int(getattr(selection, "gpus", 0) or 0) > 0 or getattr(selection.profile, "backend", "") == "runpod"


class MonitorQuotaCheck:
    """Ask the monitor whether a user may start a metered server; see the module docstring."""

    def __init__(self, url: str, token: str, *, timeout_seconds: float = 3.0, fail_closed: bool = False) -> None:
        self.url = url.rstrip("/") + "/"
        self.timeout_seconds = timeout_seconds
        self.fail_closed = fail_closed
        self._token = token

    def __repr__(self) -> str:  # the token stays out of logs and config dumps
        return f"MonitorQuotaCheck({self.url!r}, fail_closed={self.fail_closed})"

    async def ask(self, user: str) -> dict[str, Any]:
        """The monitor's answer for ``user``; RuntimeError with the reason when there is none."""
        request = HTTPRequest(
            f"{self.url}api/quota/{quote(user, safe='')}",
            headers={"Authorization": f"token {self._token}", "Accept": "application/json"},
            connect_timeout=self.timeout_seconds,
            request_timeout=self.timeout_seconds,
            follow_redirects=False,
        )
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except (HTTPClientError, OSError) as e:
            raise RuntimeError(f"no answer ({e})") from None
        if response.code != 200:
            raise RuntimeError(f"HTTP {response.code}" if response.code != 599 else f"no answer ({response.error})")
        try:
            answer = json.loads(response.body or b"")
        except ValueError:
            raise RuntimeError("the answer is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("allowed"), bool):
            raise RuntimeError("the answer has no 'allowed'")
        return answer

    async def __call__(self, spawner: Any, selection: Any) -> None:
        """Refuse (``SpawnException``) a metered spawn the user's quota does not allow."""
        from jupyterhub.spawner import SpawnException

        if not is_metered(selection):
            return
        user = spawner.user.name
        logger = getattr(spawner, "log", log)
        try:
            answer = await self.ask(user)
        except RuntimeError as e:
            if self.fail_closed:
                logger.warning("Quota of %s cannot be checked (%s): refusing the GPU spawn", user, e)
                raise SpawnException(
                    "Your GPU quota cannot be checked right now, so GPU servers cannot start. Try again in a minute, "
                    "or pick a CPU profile.",
                    reason="quota_unknown",
                    status_code=503,
                ) from None
            logger.warning(
                "Quota of %s cannot be checked (%s): allowing the spawn; the monitor checks it later", user, e
            )
            return
        if not answer["allowed"]:
            message = str(answer.get("message") or "Your GPU quota is used up.")
            logger.info("Refusing to start %s's server: %s", user, message)
            raise SpawnException(message, reason="quota", status_code=403)
