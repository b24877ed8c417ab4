"""What the culler knows about one server: the facts in the hub's model, and its kernels read at its own address.

:func:`server_facts` turns a hub user model's server (with ``state`` when the token may read it) into the policy's
:class:`~.policy.ServerFacts`. :func:`read_busy_kernels` asks the server itself, at the ``server_url`` its spawner
state records, with ``api/kernels?no_track_activity=1``: never through the proxy, which would count the read as
the user's activity and so keep every server alive forever. The token it sends is one the hub minted for that
server alone (:mod:`dolab_services.servertokens`), never the culler's own: the server is its user's to control."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from dolab_core.serverstate import ServerState
from dolab_core.times import parse_time

from .policy import ServerFacts

__all__ = ["InspectionError", "read_busy_kernels", "server_facts", "server_slots"]


def server_facts(
    user: Mapping[str, Any], name: str, server: Mapping[str, Any], now: datetime, stop_at: datetime | None = None
) -> ServerFacts:
    """The policy's view of one server of a hub user model (``servers[name]``, with ``state`` when readable).

    Profile, backend, GPUs and stop time come from the spawner's validated state (:class:`ServerState`), never
    from ``user_options``, which the user writes. ``stop_at``, when given, is a stop time the user extended to
    here; otherwise the state's.
    """
    state = ServerState.of(server)
    started = parse_time(server.get("started")) or parse_time(server.get("last_activity")) or now
    groups = user.get("groups") or ()
    return ServerFacts(
        user=str(user.get("name", "")),
        server=name,
        started=started,
        last_activity=parse_time(server.get("last_activity")),
        profile=state.profile,
        backend=state.backend,
        gpus=len(state.slots),
        groups=tuple(str(g) for g in groups),
        stop_at=stop_at or state.stop_time,
    )


def server_slots(server: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The GPU slot dicts in a server model's spawner state (none when it has no readable state)."""
    return list(ServerState.of(server).slots)


#: The most a kernel list may weigh (a server that sends more is not answering honestly).
MAX_KERNELS_BODY_BYTES = 4 << 20


class InspectionError(Exception):
    """A server's kernels could not be read; the message says why, in a few words. ``refused``: the server
    refused the token (401/403), so a new one may help."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


async def read_busy_kernels(http: AsyncHTTPClient, server_url: str, token: str, timeout_seconds: float) -> int:
    """How many kernels of the server at ``server_url`` (its own address, base URL included) are executing.

    Reads ``api/kernels?no_track_activity=1`` with ``token`` (one for that server only), directly, not through
    the proxy. Raises :class:`InspectionError` on no answer, an error status or an answer that is not a kernel
    list. ``http`` should bound the body (``max_body_size``, :data:`MAX_KERNELS_BODY_BYTES`).
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
        raise InspectionError(f"HTTP {response.code} from api/kernels", refused=response.code in (401, 403))
    try:
        kernels = json.loads(response.body or b"")
    except ValueError:
        raise InspectionError("api/kernels did not answer JSON") from None
    if not isinstance(kernels, list):
        raise InspectionError("api/kernels did not answer a list")
    return sum(1 for k in kernels if isinstance(k, Mapping) and k.get("execution_state") == "busy")
