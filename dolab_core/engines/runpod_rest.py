"""An async client for RunPod's REST API v2 (``/v2/pods``, ``/v2/catalog``): the transport issue 14 moves to.

It speaks HTTP with tornado's ``AsyncHTTPClient``, the hub's own client, rather than runpod-python 2.0: the SDK's
pod calls are synchronous (``requests``, so a thread pool), ignore ``Retry-After`` and hide fields we need, while
tornado runs every request on the hub's event loop and adds no dependency. Nothing uses this module yet: the
RunPod backend still goes through the GraphQL adapter (:mod:`dolab_core.engines.runpod`), whose types it returns
(:class:`PodInfo`, :class:`GpuType`) and whose errors it raises, plus the ones REST v2 adds here.

What every request gets (the contract is /work/shared/RUNPOD_REST_V2.md):

- a connect and a request timeout (5 s and 30 s; 60 s for a create), and a bound on the reply's size;
- one rate budget per API key for the whole process, read from the ``RateLimit`` headers and from the
  ``Retry-After`` of a 429, so all users' calls wait together instead of hammering a shared key;
- errors mapped from RFC 9457 problem replies by :func:`error_for`; 429, 5xx, timeouts, dropped connections and
  non-JSON replies are :class:`TransientError` and retried with backoff, except a create: once its request may
  have reached RunPod, a failure raises :class:`CreateOutcomeUnknown` so the caller looks the pod up by name.

The API key goes only into the ``Authorization`` header: never into a log line or an exception text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from dolab_core.engines.runpod import (
    ApiError,
    BadApiKey,
    GpuType,
    NoCapacity,
    PodInfo,
    PodSpec,
    RunPodError,
    RuntimePort,
    TransientError,
    UnknownGpuType,
)

__all__ = [
    "Conflict", "CreateOutcomeUnknown", "CreatePodRequest", "GpuOffer", "InsufficientBalance", "InvalidRequest",
    "PodNotFound", "RateBudget", "RunPodRestClient", "error_for", "gpu_offer", "parse_rate_limit", "pod_info",
    "retry_after_seconds",
]  # fmt: skip

#: Phrases of a 400 on create that mean "this GPU / data centre cannot be placed now" (v2 gives no code for it).
_NO_CAPACITY_MARKERS = (
    "no capacity", "no longer any instances available", "no instances available", "not enough free gpus",
    "could not be placed", "could not find any pods with required specifications", "not available",
)  # fmt: skip


class InsufficientBalance(ApiError):
    """RunPod refused to create a pod because the account's balance is too low (402): stop creating."""


class Conflict(ApiError):
    """The action is not allowed in the pod's current status (409): read the pod again."""


class InvalidRequest(ApiError):
    """RunPod rejected the request's shape (422): a bug in this client, never worth retrying."""


class PodNotFound(ApiError):
    """The pod is unknown, or not this key's (404)."""


class CreateOutcomeUnknown(RunPodError):
    """A create got no clear answer (timeout, dropped connection, 5xx): the pod may exist; look it up by name."""


class _NotSent(TransientError):
    """A create RunPod cannot have acted on (refused connection, 429): safe to send again."""


def _scrub(text: str, secret: str) -> str:
    """``text`` without ``secret`` in it, in case a server echoes the key back."""
    return text.replace(secret, "***") if secret else text


def error_for(status: int, body: bytes) -> RunPodError:
    """The :class:`RunPodError` for an error reply; pure, so the mapping is tested without a server."""
    problem: Mapping[str, Any] = {}
    if body:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, Mapping):
            problem = parsed
    if not problem and (status == 429 or status >= 500):
        return TransientError(f"RunPod answered {status} without a problem description.")
    title = str(problem.get("title") or "")
    detail = str(problem.get("detail") or title or f"RunPod answered {status}.")
    errors = [str(e) for e in problem.get("errors") or [] if e]
    text = detail + (f" ({'; '.join(errors)})" if errors else "")
    if status == 400 and any(marker in detail.casefold() for marker in _NO_CAPACITY_MARKERS):
        return NoCapacity(text)
    if status in (401, 403):
        return BadApiKey(text)
    if status == 402:
        return InsufficientBalance(text)
    if status == 404:
        return PodNotFound(text)
    if status == 409:
        return Conflict(text)
    if status == 422:
        return InvalidRequest(text)
    if status == 429 or status >= 500:
        return TransientError(text)
    return ApiError(text)


def parse_rate_limit(header: str) -> list[tuple[str, int, float]]:
    """``(window, requests left, seconds until it resets)`` for each window of a ``RateLimit`` header."""
    windows = []
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        values = dict(p.strip().partition("=")[::2] for p in params.split(";") if "=" in p)
        try:
            windows.append((name.strip().strip('"'), int(values["r"]), float(values.get("t", "0") or 0)))
        except (KeyError, ValueError):
            continue
    return windows


def retry_after_seconds(value: str | None, default: float = 1.0) -> float:
    """The wait a ``Retry-After`` asks for (integer seconds per the spec; anything else: ``default``)."""
    try:
        return max(0.0, float(value)) if value else default
    except ValueError:
        return default


class RateBudget:
    """The requests one API key may still make before its tightest window resets; shared by the process."""

    def __init__(self) -> None:
        self.remaining: int | None = None  # unknown until a reply carries RateLimit
        self.resume_at = 0.0  # time.monotonic() before which no request goes out

    def delay_seconds(self) -> float:
        """How long the next request must wait; counts it against the budget when it may go."""
        now = time.monotonic()
        if self.resume_at > now:
            return self.resume_at - now
        if self.remaining is not None:
            self.remaining -= 1
        return 0.0

    def update(self, header: str | None) -> None:
        """Take the server's count: a window with nothing left holds every request until it resets."""
        windows = parse_rate_limit(header or "")
        if not windows:
            return
        self.remaining = min(left for _, left, _ in windows)
        exhausted = [reset for _, left, reset in windows if left <= 0]
        if exhausted:
            self.resume_at = max(self.resume_at, time.monotonic() + max(exhausted))

    def hold(self, seconds: float) -> None:
        """A 429: nobody sends for ``seconds``."""
        self.resume_at = max(self.resume_at, time.monotonic() + seconds)


#: One budget per (API, key digest): every client of the process on one key shares it.
_BUDGETS: dict[tuple[str, str], RateBudget] = {}


def _budget(base_url: str, api_key: str) -> RateBudget:
    digest = hashlib.sha256(api_key.encode()).hexdigest()
    return _BUDGETS.setdefault((base_url, digest), RateBudget())


@dataclass(frozen=True)
class CreatePodRequest:
    """What ``POST /v2/pods`` gets: one GPU type, one cloud, preferred data centres (v2 has no fallback list)."""

    name: str
    image: str
    gpu_id: str
    gpu_count: int = 1
    cloud: str = "SECURE"  # SECURE or COMMUNITY: v2 has no ALL
    data_center_ids: tuple[str, ...] = ()
    disk_gb: int = 20
    persistent_gb: int = 0
    mount_path: str = "/workspace"
    network_volume_id: str = ""
    ports: tuple[str, ...] = ("8888/http",)
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # holds the server's token
    args: str = ""

    @classmethod
    def from_spec(cls, spec: PodSpec, cloud: str = "", data_center_ids: tuple[str, ...] = ()) -> CreatePodRequest:
        """The v2 request for a GraphQL :class:`PodSpec`; ``cloud`` replaces its ALL (one cloud per create)."""
        return cls(
            name=spec.name,
            image=spec.image,
            gpu_id=spec.gpu_type_id,
            gpu_count=spec.gpu_count,
            cloud=cloud or (spec.cloud_type if spec.cloud_type != "ALL" else "SECURE"),
            data_center_ids=data_center_ids,
            disk_gb=spec.container_disk_gb,
            persistent_gb=spec.volume_gb,
            mount_path=spec.volume_mount_path,
            network_volume_id=spec.network_volume_id,
            ports=tuple(p.strip() for p in spec.ports.split(",") if p.strip()),
            env=dict(spec.env),
            args=spec.docker_args,
        )

    def body(self) -> dict[str, Any]:
        """The JSON body: only fields the schema has (an unknown one is a 422), empty ones left out."""
        body: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "gpu": {"id": self.gpu_id, "count": self.gpu_count},
            "cloud": self.cloud,
            "disk": self.disk_gb,
            "ports": list(self.ports),
            "env": dict(self.env),
        }
        if self.data_center_ids:
            body["dataCenterIds"] = list(self.data_center_ids)
        if self.network_volume_id:
            body["mounts"] = {"network": [{"volumeId": self.network_volume_id, "path": self.mount_path}]}
        elif self.persistent_gb:
            body["mounts"] = {"persistent": {"size": self.persistent_gb, "path": self.mount_path}}
        if self.args:
            body["args"] = self.args
        return body


def pod_info(raw: Mapping[str, Any]) -> PodInfo:
    """A v2 Pod as the adapter's :class:`PodInfo`: ``status`` fills ``desired_status``, ``cost`` the hourly cost."""
    runtime = raw.get("runtime") or {}  # null unless RUNNING; the create reply shows {}
    ports = tuple(
        RuntimePort(
            ip=str(p.get("ip") or ""),
            private_port=int(p.get("private") or 0),
            public_port=int(p.get("public") or 0),
            kind=str(p.get("type") or ""),
            # v2 drops isIpPublic; a TCP entry is documented as reachable at ip:public.
            is_ip_public=str(p.get("type") or "") == "tcp",
        )
        for p in runtime.get("ports") or []
    )
    gpu = raw.get("gpu") or {}
    return PodInfo(
        id=str(raw["id"]),
        name=str(raw.get("name") or ""),
        desired_status=str(raw.get("status") or ""),
        cost_per_hr=float(raw.get("cost") or 0),
        gpu_count=int(gpu.get("count") or 0),
        image=str(raw.get("image") or ""),
        gpu_name=str(gpu.get("id") or ""),
        ports=ports,
        has_runtime=bool(runtime),
        env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
    )


@dataclass(frozen=True)
class GpuOffer:
    """A catalog GPU type with its stock: ``availability`` NONE/LOW/MEDIUM/HIGH, also per data centre."""

    gpu: GpuType
    availability: str = ""
    max_count: int = 0  # a ceiling per pod, not stock
    data_centers: tuple[tuple[str, str], ...] = ()  # (data centre id, availability)


def gpu_offer(raw: Mapping[str, Any]) -> GpuOffer:
    """A v2 catalog GpuType as a :class:`GpuOffer`; prices are list USD/h for one GPU, None where not offered."""
    price = raw.get("price") or {}

    def offered(cloud: str) -> float | None:
        value = price.get(cloud)
        return float(value) if raw.get(cloud) is not False and value else None

    gpu = GpuType(
        id=str(raw["id"]),
        display_name=str(raw.get("name") or raw["id"]),
        memory_gb=float(raw.get("memory") or 0),
        secure_price=offered("secure"),
        community_price=offered("community"),
    )
    centres = tuple((str(dc.get("id")), str(dc.get("availability") or "")) for dc in raw.get("dataCenters") or [])
    return GpuOffer(gpu, str(raw.get("availability") or ""), int(raw.get("maxCount") or 0), centres)


class RunPodRestClient:
    """RunPod's REST v2 on the running event loop; one per API key and base URL is enough for a process."""

    def __init__(
        self,
        api_key: str,
        base_url: str = "https://api.runpod.io",
        connect_timeout_seconds: float = 5.0,
        request_timeout_seconds: float = 30.0,
        create_timeout_seconds: float = 60.0,
        max_reply_bytes: int = 8 * 1024 * 1024,
        retries: int = 3,
        backoff_seconds: float = 0.5,
        max_wait_seconds: float = 120.0,
        log: logging.Logger | None = None,
    ) -> None:
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.connect_timeout_seconds = connect_timeout_seconds
        self.request_timeout_seconds = request_timeout_seconds
        self.create_timeout_seconds = create_timeout_seconds
        self.max_reply_bytes = max_reply_bytes
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.max_wait_seconds = max_wait_seconds
        self.log = log or logging.getLogger(__name__)
        self.budget = _budget(self.base_url, api_key)
        # The simple client (not the configured class, which may be curl) so max_body_size bounds every reply.
        self._http = SimpleAsyncHTTPClient(force_instance=True, max_body_size=max_reply_bytes)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()

    async def _send(
        self, method: str, path: str, body: Any = None, timeout: float = 0.0, accept: str = "application/json"
    ) -> HTTPResponse:
        """One request after the rate budget allows it; transport failures raise, HTTP errors return."""
        while (delay := self.budget.delay_seconds()) > 0:
            if delay > self.max_wait_seconds:
                # Nothing was sent, so even a create may go again later; the caller decides when.
                raise _NotSent(f"RunPod's rate limit holds this key's requests for {delay:.0f} s more.")
            self.log.warning("RunPod rate limit reached; waiting %.1f s", delay)
            await asyncio.sleep(delay)
        request = HTTPRequest(
            self.base_url + path,
            method=method,
            headers={
                "Authorization": f"Bearer {self._api_key}",
                "Accept": accept,
                **({"Content-Type": "application/json"} if body is not None else {}),
            },
            body=json.dumps(body) if body is not None else None,
            connect_timeout=self.connect_timeout_seconds,
            request_timeout=timeout or self.request_timeout_seconds,
            follow_redirects=False,  # a redirect would carry the key elsewhere
        )
        response = await self._http.fetch(request, raise_error=False)
        self.budget.update(response.headers.get("RateLimit"))
        if response.code == 429:
            self.budget.hold(retry_after_seconds(response.headers.get("Retry-After")))
        return response

    def _failure(self, error: BaseException) -> TransientError:
        """A transport failure (no HTTP reply) as a sentence without the key."""
        if isinstance(error, HTTPClientError) and error.code == 599:
            # A reply over max_reply_bytes ends the same way: tornado closes the connection.
            return TransientError(_scrub(f"No full reply from RunPod: {error.message}.", self._api_key))
        return TransientError(_scrub(f"Could not reach RunPod ({type(error).__name__}: {error}).", self._api_key))

    def _error(self, response: HTTPResponse) -> RunPodError:
        """The mapped error of a reply, its text scrubbed of the key should a server echo it."""
        error = error_for(response.code, response.body or b"")
        return type(error)(_scrub(str(error), self._api_key))

    def _reply(self, response: HTTPResponse) -> Any:
        """The JSON of a 2xx reply (None for 204), or the mapped error."""
        if response.code >= 300:
            raise self._error(response)
        if response.code == 204 or not response.body:
            return None
        try:
            return json.loads(response.body)
        except ValueError:
            raise TransientError(f"RunPod answered {response.code} with a reply that is not JSON.") from None

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        """A request that is safe to repeat: transient failures retried with exponential backoff."""
        attempt = 0
        while True:
            attempt += 1
            try:
                try:
                    response = await self._send(method, path, body)
                except TransientError:
                    raise
                except Exception as e:
                    raise self._failure(e) from None
                return self._reply(response)
            except TransientError as error:
                if attempt > self.retries:
                    raise
                # A 429 already set the shared budget's wait; the backoff only adds to it.
                delay = self.backoff_seconds * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
                self.log.warning("RunPod %s %s failed (%s); retry %d of %d", method, path, error, attempt, self.retries)
                await asyncio.sleep(delay)

    async def create_pod(self, request: CreatePodRequest) -> PodInfo:
        """Create one pod; NoCapacity means try the next (GPU, cloud, data centre) candidate.

        Retried only when RunPod cannot have acted on it (a refused connection, a 429); after anything else that
        is not an answer, :class:`CreateOutcomeUnknown`: find the pod by name before creating it again.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                pod = await self._create_once(request)
            except _NotSent as error:
                if attempt > self.retries:
                    raise TransientError(str(error)) from None
                self.log.warning("RunPod create of %s not sent (%s); retry %d", request.name, error, attempt)
                await asyncio.sleep(self.backoff_seconds * 2 ** (attempt - 1))
                continue
            self.log.info("RunPod pod %s (%s) created on %s", pod.id, pod.name, request.gpu_id)
            return pod

    async def _create_once(self, request: CreatePodRequest) -> PodInfo:
        unknown = f"Creating pod {request.name} got no clear answer"
        try:
            response = await self._send("POST", "/v2/pods", request.body(), timeout=self.create_timeout_seconds)
        except _NotSent:
            raise
        except (ConnectionRefusedError, HTTPClientError) as e:
            if isinstance(e, ConnectionRefusedError) or "while connecting" in str(e):
                raise _NotSent(str(self._failure(e))) from None
            raise CreateOutcomeUnknown(f"{unknown} (no reply in time).") from None
        except Exception as e:
            raise CreateOutcomeUnknown(f"{unknown} ({type(e).__name__}).") from None
        if response.code == 429:
            raise _NotSent("RunPod is rate limiting this key.")
        if response.code >= 500:
            raise CreateOutcomeUnknown(f"{unknown} (RunPod answered {response.code}).")
        try:
            return pod_info(self._reply(response))
        except TransientError:
            raise CreateOutcomeUnknown(f"{unknown} (a reply that is not JSON).") from None

    async def get_pod(self, pod_id: str) -> PodInfo | None:
        """The pod, or None when RunPod does not know it (gone, or not this key's)."""
        try:
            return pod_info(await self._call("GET", f"/v2/pods/{quote(pod_id, safe='')}"))
        except PodNotFound:
            return None

    async def list_pods(self, name_prefix: str = "") -> list[PodInfo]:
        """This key's pods whose name starts with ``name_prefix`` (v2 filters nothing server-side)."""
        pods: list[PodInfo] = []
        cursor = ""
        for _ in range(100):  # the spec shows no pagination; follow a cursor if one appears, within reason
            reply = await self._call("GET", "/v2/pods" + (f"?{urlencode({'cursor': cursor})}" if cursor else ""))
            pods += [pod_info(p) for p in reply.get("pods") or [] if str(p.get("name") or "").startswith(name_prefix)]
            cursor = str((reply.get("pagination") or {}).get("nextCursor") or "")
            if not cursor:
                break
        return pods

    async def _action(self, pod_id: str, action: str) -> PodInfo | None:
        reply = await self._call("POST", f"/v2/pods/{quote(pod_id, safe='')}/action", {"action": action})
        self.log.info("RunPod pod %s: %s", pod_id, action)
        return pod_info(reply) if reply else None

    async def stop_pod(self, pod_id: str) -> PodInfo | None:
        """Stop the pod (its disk stays); Conflict if its status allows no stop."""
        return await self._action(pod_id, "stop")

    async def start_pod(self, pod_id: str) -> PodInfo | None:
        """Start a stopped pod on its host; Conflict if its status allows no start."""
        return await self._action(pod_id, "start")

    async def terminate_pod(self, pod_id: str) -> None:
        """Delete the pod and its persistent mount; a pod already gone counts as done."""
        try:
            await self._call("DELETE", f"/v2/pods/{quote(pod_id, safe='')}")
        except PodNotFound:
            self.log.info("RunPod pod %s was already gone", pod_id)
            return
        self.log.info("RunPod pod %s terminated", pod_id)

    async def gpu_catalog(self, gpu_count: int = 1, cloud: str = "", gpu_id: str = "") -> list[GpuOffer]:
        """The GPU types with their stock for pods of ``gpu_count`` GPUs (one type if ``gpu_id``)."""
        query = {"include": "AVAILABILITY", "product": "POD", "count": str(gpu_count)}
        if cloud:
            query["cloud"] = cloud
        path = "/v2/catalog/gpus" + (f"/{quote(gpu_id, safe='')}" if gpu_id else "")
        try:
            reply = await self._call("GET", f"{path}?{urlencode(query)}")
        except PodNotFound:
            raise UnknownGpuType(f"RunPod knows no GPU type {gpu_id!r}.") from None
        return [gpu_offer(g) for g in reply.get("gpus") or []] if not gpu_id else [gpu_offer(reply)]

    async def pod_logs(self, pod_id: str, tail: int = 200) -> list[str]:
        """The last ``tail`` log lines of the pod (the ``data`` of each server-sent event), bounded in size."""
        path = f"/v2/pods/{quote(pod_id, safe='')}/logs?{urlencode({'tail': str(tail)})}"
        try:
            response = await self._send("GET", path, accept="text/event-stream")
        except TransientError:
            raise
        except Exception as e:
            raise self._failure(e) from None
        if response.code >= 300:
            raise self._error(response)
        text = (response.body or b"").decode("utf-8", "replace")
        return [line[5:].removeprefix(" ") for line in text.splitlines() if line.startswith("data:")]
