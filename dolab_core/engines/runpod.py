"""The one adapter between DO-LAB and RunPod's API: the only module that imports the runpod SDK.

The SDK (1.12.0) speaks GraphQL synchronously with ``requests``, pastes every argument into the document without
escaping, and raises a mix of its own and ``requests``' exceptions. This module:

- runs every SDK call on a small bounded thread pool, with a timeout on top of the SDK's own (30 s), never on the
  hub's event loop; the SDK itself is imported on that pool at the first call (it takes over a second);
- escapes every string it hands the SDK (``json.dumps(s)[1:-1]``), so a quote or a newline in a name, image, env
  value or command can neither break nor extend the document;
- classifies failures into :class:`RunPodError` subclasses: :class:`NoCapacity`, :class:`BadApiKey`,
  :class:`UnknownGpuType`, :class:`TransientError` (429, 5xx, non-JSON replies, timeouts, refused connections:
  retried with exponential backoff first) and :class:`ApiError` (anything else);
- returns plain dataclasses (:class:`PodInfo`, :class:`GpuType`), so the announced REST transport can replace
  GraphQL here without touching the backend.

The API key is set once as the SDK's module global (the SDK reads no environment variable for it, and its
create/stop/terminate calls take no key argument); it never appears in a log line or an exception text.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import string
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from escapism import escape as escape_name

__all__ = [
    "CLOUD_TYPES",
    "ApiError",
    "BadApiKey",
    "GpuType",
    "NoCapacity",
    "PodInfo",
    "PodSpec",
    "RunPodApi",
    "RunPodError",
    "RuntimePort",
    "TransientError",
    "UnknownGpuType",
    "classify",
    "escape",
    "hub_pod_prefix",
    "pod_name",
    "shared_api",
]

#: The SDK's cloud types, by the names profiles use.
CLOUD_TYPES = {"secure": "SECURE", "community": "COMMUNITY", "all": "ALL"}

#: SDK calls that take the key as an argument; the others read the module global ``runpod.api_key``.
_TAKES_KEY = {"get_pod", "get_pods", "get_gpu", "get_gpus"}
_KEYS: set[str] = set()
_GLOBAL_KEY_LOCK = threading.Lock()

_NO_CAPACITY_MARKERS = ("no longer any instances available", "not enough free gpus", "no instances available")
_TRANSIENT_MARKERS = ("something went wrong", "too many requests", "rate limit", "try again later", "timed out")


class RunPodError(Exception):
    """A RunPod call failed; ``str()`` is a short description safe to log (no key, no pod env)."""


class NoCapacity(RunPodError):
    """RunPod has no machine with the requested GPU type, count and cloud right now."""


class BadApiKey(RunPodError):
    """RunPod refused the API key (missing, wrong or revoked)."""


class UnknownGpuType(RunPodError):
    """RunPod does not know the GPU type id."""


class TransientError(RunPodError):
    """Rate limiting, a server error, a reply that is not JSON, or no reply in time: worth retrying later."""


class ApiError(RunPodError):
    """RunPod answered with an error that retrying will not fix."""


def escape(value: str) -> str:
    """A string made safe to paste between double quotes in a GraphQL document (the SDK does no escaping)."""
    return json.dumps(str(value), ensure_ascii=False)[1:-1]


def classify(error: BaseException) -> RunPodError:
    """Map what the SDK (or the thread pool) raised to a :class:`RunPodError`; pure, for unit tests."""
    if isinstance(error, RunPodError):
        return error
    name = type(error).__name__
    module = type(error).__module__
    message = str(getattr(error, "message", None) or error)
    lowered = message.casefold()
    if name == "AuthenticationError" and module.startswith("runpod"):
        return BadApiKey(message)
    if name == "QueryError" and module.startswith("runpod"):
        if any(marker in lowered for marker in _NO_CAPACITY_MARKERS):
            return NoCapacity(message)
        if any(marker in lowered for marker in _TRANSIENT_MARKERS):
            return TransientError(message)
        return ApiError(message)
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return TransientError("no reply in time")
    # requests' exceptions: a JSONDecodeError (a 429 or 502 page) is a ValueError too, so test it first.
    if module.startswith(("requests", "urllib3")) or name == "JSONDecodeError":
        if name == "JSONDecodeError":
            return TransientError("the reply was not JSON (rate limited, or a gateway error)")
        return TransientError(f"{name}: {message}")
    if isinstance(error, ValueError) and "no gpu found" in lowered:
        return UnknownGpuType(message)
    if isinstance(error, (KeyError, TypeError)):
        # A JSON reply without the expected "data" (an error page in JSON): the server is not well.
        return TransientError(f"unexpected reply ({name}: {message})")
    return ApiError(f"{name}: {message}")


@dataclass(frozen=True)
class PodSpec:
    """What to create: every field as RunPod names it, strings unescaped (the adapter escapes them)."""

    name: str
    image: str
    gpu_type_id: str
    gpu_count: int = 1
    cloud_type: str = "SECURE"  # SECURE, COMMUNITY or ALL
    container_disk_gb: int = 20
    volume_gb: int = 0
    volume_mount_path: str = "/workspace"
    network_volume_id: str = ""
    ports: str = "8888/http"
    env: Mapping[str, str] = field(default_factory=dict)
    docker_args: str = ""


@dataclass(frozen=True)
class RuntimePort:
    """A port of a running pod: ``public_port`` on ``ip`` reaches ``private_port`` in the container."""

    ip: str
    private_port: int
    public_port: int
    kind: str  # http or tcp
    is_ip_public: bool = False


@dataclass(frozen=True)
class PodInfo:
    """A pod as RunPod reports it."""

    id: str
    name: str
    desired_status: str
    cost_per_hr: float
    gpu_count: int
    image: str
    gpu_name: str = ""
    ports: tuple[RuntimePort, ...] = ()
    has_runtime: bool = False
    #: The pod's environment ("KEY=value" read back); holds the server's token: never log it.
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def running(self) -> bool:
        """RUNNING with a container: runtime ports of an EXITED pod may be stale, so they count only here."""
        return self.desired_status == "RUNNING" and self.has_runtime

    def port(self, private_port: int) -> RuntimePort | None:
        """The runtime entry of ``private_port`` once the pod runs, else None."""
        if not self.running:
            return None
        return next((p for p in self.ports if p.private_port == private_port), None)

    @classmethod
    def from_api(cls, raw: Mapping[str, Any]) -> PodInfo:
        """Build from the SDK's ``get_pod``/``get_pods`` dict."""
        runtime = raw.get("runtime") or None
        ports = tuple(
            RuntimePort(
                ip=str(p.get("ip") or ""),
                private_port=int(p.get("privatePort") or 0),
                public_port=int(p.get("publicPort") or 0),
                kind=str(p.get("type") or ""),
                is_ip_public=bool(p.get("isIpPublic")),
            )
            for p in ((runtime or {}).get("ports") or [])
        )
        return cls(
            id=str(raw["id"]),
            name=str(raw.get("name") or ""),
            desired_status=str(raw.get("desiredStatus") or ""),
            cost_per_hr=float(raw.get("costPerHr") or 0),
            gpu_count=int(raw.get("gpuCount") or 0),
            image=str(raw.get("imageName") or ""),
            gpu_name=str((raw.get("machine") or {}).get("gpuDisplayName") or ""),
            ports=ports,
            has_runtime=runtime is not None,
            env=dict(str(item).partition("=")[::2] for item in raw.get("env") or []),
        )


@dataclass(frozen=True)
class GpuType:
    """A GPU type with its on-demand prices in USD per GPU-hour (None: not offered in that cloud)."""

    id: str
    display_name: str
    memory_gb: float
    secure_price: float | None
    community_price: float | None

    def price(self, cloud_type: str) -> float | None:
        """The hourly price per GPU in a cloud type (SECURE, COMMUNITY, or ALL: the cheaper one offered)."""
        if cloud_type == "SECURE":
            return self.secure_price
        if cloud_type == "COMMUNITY":
            return self.community_price
        offered = [p for p in (self.secure_price, self.community_price) if p]
        return min(offered) if offered else None


class RunPodApi:
    """Async access to RunPod through the SDK: create, get, list, stop, resume, terminate, GPU types and prices."""

    def __init__(
        self,
        api_key: str,
        *,
        pool_size: int = 4,
        call_timeout_seconds: float = 40,
        retries: int = 3,
        backoff_seconds: float = 1.0,
        price_ttl_seconds: float = 300,
        log: logging.Logger | None = None,
    ) -> None:
        self._api_key = api_key
        self._pool = ThreadPoolExecutor(pool_size, thread_name_prefix="dolab-runpod")
        self.call_timeout_seconds = call_timeout_seconds
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.price_ttl_seconds = price_ttl_seconds
        self.log = log or logging.getLogger("dolab.runpod")
        self._prices: dict[str, tuple[float, GpuType]] = {}
        self._sdk_lock = threading.Lock()
        self._sdk: Any = None
        _KEYS.add(api_key)  # set.add is atomic; never wait for _GLOBAL_KEY_LOCK here (the event loop calls this)

    def __repr__(self) -> str:
        return f"<RunPodApi pool={self._pool._max_workers}>"  # never the key

    # ----- plumbing -----------------------------------------------------------------------------------

    def _load_sdk(self) -> Any:
        """Import the SDK (on the pool: it takes over a second) and give it the key."""
        with self._sdk_lock:
            if self._sdk is None:
                import runpod

                runpod.api_key = self._api_key
                self._sdk = runpod
            return self._sdk

    def _run_sdk(self, what: str, *args: Any, **kwargs: Any) -> Any:
        sdk = self._load_sdk()
        if what in _TAKES_KEY:
            return getattr(sdk, what)(*args, api_key=self._api_key, **kwargs)
        # create/stop/resume/terminate read only the module global. With one key per process (the usual case) it
        # is set once; with several, each such call holds the global for its whole duration.
        if len(_KEYS) == 1:
            sdk.api_key = self._api_key
            return getattr(sdk, what)(*args, **kwargs)
        with _GLOBAL_KEY_LOCK:
            sdk.api_key = self._api_key
            return getattr(sdk, what)(*args, **kwargs)

    async def _call(self, what: str, *args: Any, retry: bool = True, **kwargs: Any) -> Any:
        """``runpod.<what>(*args, **kwargs)`` on the pool, with a timeout; transient failures retried with backoff."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            try:
                call = functools.partial(self._run_sdk, what, *args, **kwargs)
                return await asyncio.wait_for(loop.run_in_executor(self._pool, call), self.call_timeout_seconds)
            except Exception as e:
                error = classify(e)
                if not (retry and isinstance(error, TransientError) and attempt <= self.retries):
                    raise error from None
                delay = self.backoff_seconds * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
                self.log.warning(
                    "RunPod %s failed (%s); retry %d of %d in %.1f s", what, error, attempt, self.retries, delay
                )
                await asyncio.sleep(delay)

    # ----- pods ---------------------------------------------------------------------------------------

    async def create_pod(self, spec: PodSpec) -> str:
        """Create a pod; returns its id. Raises :class:`NoCapacity`, :class:`BadApiKey`, ... .

        A transient failure may hide a pod that was created anyway: before each retry, a pod of the same name
        (names are unique per server) is looked up and adopted instead of creating a second one.
        """
        kwargs: dict[str, Any] = {
            "name": escape(spec.name),
            "image_name": escape(spec.image),
            "gpu_type_id": escape(spec.gpu_type_id),
            "cloud_type": spec.cloud_type if spec.cloud_type in CLOUD_TYPES.values() else "SECURE",
            "gpu_count": int(spec.gpu_count),
            "volume_in_gb": int(spec.volume_gb),
            "container_disk_in_gb": int(spec.container_disk_gb),
            "ports": escape(spec.ports),
            "volume_mount_path": escape(spec.volume_mount_path),
            "env": {escape(k): escape(v) for k, v in spec.env.items()},
            "docker_args": escape(spec.docker_args),
            "support_public_ip": True,
            "start_ssh": False,
        }
        if spec.network_volume_id:
            kwargs["network_volume_id"] = escape(spec.network_volume_id)
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = await self._call("create_pod", retry=False, **kwargs)
                return str(reply["id"])
            except TransientError as error:
                if attempt > self.retries:
                    raise
                delay = self.backoff_seconds * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
                self.log.warning(
                    "RunPod create_pod failed (%s); retry %d of %d in %.1f s", error, attempt, self.retries, delay
                )
                await asyncio.sleep(delay)
                existing = await self.find_pod(spec.name)
                if existing is not None:
                    self.log.info("Pod %s (%s) was created despite the error; using it", existing.id, spec.name)
                    return existing.id
            except (KeyError, TypeError) as e:
                raise ApiError(f"unexpected reply to create_pod ({type(e).__name__})") from None

    async def get_pod(self, pod_id: str) -> PodInfo | None:
        """The pod, or None when RunPod does not know it (terminated, or never created)."""
        raw = await self._call("get_pod", escape(pod_id))
        return PodInfo.from_api(raw) if raw else None

    async def list_pods(self, name_prefix: str = "") -> list[PodInfo]:
        """Every pod of the account whose name starts with ``name_prefix``."""
        raw = await self._call("get_pods")
        return [PodInfo.from_api(p) for p in raw or [] if str(p.get("name") or "").startswith(name_prefix)]

    async def find_pod(self, name: str) -> PodInfo | None:
        """The pod called exactly ``name`` (a running one first), or None."""
        matches = [p for p in await self.list_pods(name) if p.name == name]
        matches.sort(key=lambda p: p.desired_status != "RUNNING")
        return matches[0] if matches else None

    async def stop_pod(self, pod_id: str) -> None:
        """Stop the pod, keeping its volume (billed for disk only)."""
        await self._call("stop_pod", escape(pod_id))

    async def resume_pod(self, pod_id: str, gpu_count: int) -> None:
        """Start a stopped pod again (may raise :class:`NoCapacity`: its host has no free GPUs)."""
        await self._call("resume_pod", escape(pod_id), int(gpu_count))

    async def terminate_pod(self, pod_id: str) -> None:
        """Terminate the pod; a pod that is already gone is fine (idempotent)."""
        try:
            await self._call("terminate_pod", escape(pod_id))
        except (ApiError, TransientError):
            # RunPod answers an unknown pod with an error: gone is what we wanted.
            if await self.get_pod(pod_id) is None:
                return
            raise

    # ----- GPU types and prices -------------------------------------------------------------------------

    async def gpu_type(self, gpu_type_id: str, gpu_count: int = 1) -> GpuType:
        """One GPU type with live prices, cached for ``price_ttl_seconds``. Raises :class:`UnknownGpuType`."""
        cached = self._prices.get(gpu_type_id)
        if cached is not None and time.monotonic() - cached[0] < self.price_ttl_seconds:
            return cached[1]
        raw = await self._call("get_gpu", escape(gpu_type_id), int(gpu_count))
        gpu = GpuType(
            id=str(raw.get("id") or gpu_type_id),
            display_name=str(raw.get("displayName") or gpu_type_id),
            memory_gb=float(raw.get("memoryInGb") or 0),
            secure_price=_price(raw.get("securePrice")) if raw.get("secureCloud", True) else None,
            community_price=_price(raw.get("communityPrice")) if raw.get("communityCloud", True) else None,
        )
        self._prices[gpu_type_id] = (time.monotonic(), gpu)
        return gpu

    async def gpu_types(self, gpu_type_ids: list[str]) -> dict[str, GpuType | None]:
        """Several GPU types at once (None for one that failed: a form can still render)."""

        async def one(gpu_id: str) -> GpuType | None:
            try:
                return await self.gpu_type(gpu_id)
            except RunPodError as e:
                self.log.warning("RunPod price of %s unavailable: %s", gpu_id, e)
                return None

        results = await asyncio.gather(*(one(g) for g in gpu_type_ids))
        return dict(zip(gpu_type_ids, results, strict=True))

    def close(self) -> None:
        """Stop the worker threads (calls in flight finish on their own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _price(value: Any) -> float | None:
    try:
        price = float(value)
    except (TypeError, ValueError):
        return None
    return price if price > 0 else None


_shared: dict[tuple[Any, ...], RunPodApi] = {}
_shared_lock = threading.Lock()


def shared_api(api_key: str, **settings: Any) -> RunPodApi:
    """The hub-wide adapter for a key and settings (one pool and one price cache per hub process)."""
    key = (api_key, *sorted(settings.items()))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = RunPodApi(api_key, **settings)
        return _shared[key]


# ----- pod names ----------------------------------------------------------------------------------------------

_SAFE = set(string.ascii_lowercase + string.digits)


def pod_name(prefix: str, username: str, server_name: str = "") -> str:
    """The deterministic pod name of a server: ``<prefix><escaped user>[--<server>]``.

    The escaped user name holds only letters, digits and ``-``, always followed by two hex digits, so ``--``
    cannot occur in it and the server name is unambiguous.
    """
    name = prefix + escape_name(username, safe=_SAFE, escape_char="-")
    return f"{name}--{server_name}" if server_name else name


def hub_pod_prefix(prefix: str, hub_id: str) -> str:
    """The start of every pod name of hub ``hub_id``: ``<prefix><hub id>-`` (what its reaper looks for)."""
    return f"{prefix}{hub_id}-"
