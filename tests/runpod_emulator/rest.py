"""RunPod's REST API v2 (shared/RUNPOD_REST_V2.md) on the emulator's own pod store.

The same pods answer over GraphQL and over ``/v2/...``: a create here calls the emulator's
``podFindAndDeployOnDemand`` (so it boots as a container or a record the same way), stop/start/terminate call
``podStop``/``podResume``/``podTerminate``. What REST v2 adds and GraphQL has no place for (the data centre, a pod
hidden until a late create lands, log lines in record mode, the rate budget) lives in :class:`RestState`.

Routes: ``POST/GET /v2/pods``, ``GET/DELETE /v2/pods/{id}``, ``POST /v2/pods/{id}/action``, ``GET
/v2/pods/{id}/logs`` (SSE, all lines then the end), ``GET /v2/catalog/gpus[/{id}]``. Errors are problem+json.
Each route has a fault name (``rest:create``, ``rest:list``, ``rest:get``, ``rest:delete``, ``rest:action``,
``rest:logs``, ``rest:catalog``) that ``/_emulator/faults`` ``replies[].field`` takes; a fault with a status and
no body gets a problem+json body fitting its status (a 429 also ``Retry-After``). REST-only controls are under
``/_emulator/rest/<what>`` (see :class:`RestControlHandler`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from tornado import web

from .schema import NO_CAPACITY
from .server import Emulator, Pod

DATA_CENTERS = ("EU-RO-1", "US-TX-3", "EU-SE-1")
CUDA_VERSION = "12.4"
CREATE_FIELDS = {
    "name", "image", "gpu", "cpu", "cloud", "dataCenterIds", "disk", "mounts", "ports", "env", "args", "registry",
    "templateId", "startSsh", "startJupyter", "globalNetworking",
}  # fmt: skip
GPU_FIELDS = {"id", "count", "allowedCudaVersions", "minCudaVersion"}
#: The moves each status allows (the Pod's ``actions``).
ACTIONS = {
    "PROVISIONING": ["stop", "terminate"],
    "STARTING": ["stop", "terminate"],
    "RUNNING": ["stop", "restart", "terminate"],
    "EXITED": ["start", "terminate"],
    "ERROR": ["start", "terminate"],
}
#: The problem detail a fault gets when the test gave no body.
FAULT_DETAILS = {
    400: NO_CAPACITY,
    401: "The API key is missing or not valid.",
    402: "Your balance is too low to create this pod. Add funds and try again.",
    404: "No pod with this id exists in your account.",
    409: "This action is not allowed in the pod's current status.",
    422: "The request body does not match the schema.",
    429: "Too many requests: wait and try again.",
}


def fault_detail(status: int) -> str:
    """The problem detail of an injected status: RunPod's words where known, else the status's phrase."""
    return FAULT_DETAILS.get(status) or f"{HTTPStatus(status).phrase}."


@dataclass
class LateCreate:
    """A create that lands late: the pod appears ``land_after_seconds`` after the request arrived, while the reply
    is ``status`` after ``delay_seconds`` (201: the pod at once, but invisible to reads until it lands)."""

    land_after_seconds: float
    status: int = 504
    delay_seconds: float = 0.0
    times: int = 1


@dataclass
class RestState:
    """What REST v2 knows about that the emulator's GraphQL store does not."""

    data_centers: dict[str, str] = field(default_factory=dict)  # pod id -> dataCenterId
    hidden_until: dict[str, float] = field(default_factory=dict)  # pod id -> unix time it becomes visible
    logs: dict[str, list[str]] = field(default_factory=dict)  # pod id -> log lines (record mode)
    no_capacity_dc: set[tuple[str, str]] = field(default_factory=set)  # (gpu id, data centre)
    availability: dict[str, str] = field(default_factory=dict)  # gpu id -> catalog availability override
    late_creates: list[LateCreate] = field(default_factory=list)
    quota_per_minute: int = 1000
    retry_after_seconds: int = 1
    window_start: float = field(default_factory=time.time)
    used: int = 0

    def spend(self) -> tuple[int, int]:
        """Count one request against the minute window: (requests left, seconds until the window resets)."""
        now = time.time()
        if now - self.window_start >= 60:
            self.window_start, self.used = now, 0
        self.used += 1
        return self.quota_per_minute - self.used, max(1, int(60 - (now - self.window_start)))

    def take_late_create(self) -> LateCreate | None:
        """The next late-landing create fault, used once."""
        for late in self.late_creates:
            if late.times > 0:
                late.times -= 1
                return late
        return None

    def visible(self, pod_id: str) -> bool:
        """False while a late-landing create's pod has not landed yet."""
        return time.time() >= self.hidden_until.get(pod_id, 0.0)


def _iso(unix: float) -> str | None:
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if unix else None


def pod_status(pod: Pod) -> str:
    """The emulator's pod as a REST v2 PodStatus (a pod whose container could not start is ERROR)."""
    if pod.desired_status == "EXITED":
        return "EXITED"
    if pod.problem:
        return "ERROR"
    if pod.container_running:
        return "RUNNING"
    return "STARTING" if pod.boots else "PROVISIONING"


def pod_to_rest(pod: Pod, data_center: str) -> dict[str, Any]:
    """The emulator's pod as REST v2's Pod (call with the emulator's lock held)."""
    status = pod_status(pod)
    mounts: dict[str, Any] = {}
    if pod.volume_gb:
        mounts["persistent"] = {"size": pod.volume_gb, "path": pod.volume_mount_path or "/workspace"}
    if pod.network_volume_id:
        mounts["network"] = [{"volumeId": pod.network_volume_id, "path": pod.volume_mount_path or "/workspace"}]
    runtime = None
    if status == "RUNNING":
        runtime = {
            "uptime": int(time.time() - pod.started_at),
            "gpus": [{"id": f"gpu-{i}", "utilization": 0, "memoryUtilization": 0} for i in range(pod.gpu_count)],
            "cpu": {"utilization": 0},
            "memory": {"utilization": 0},
            "ports": [
                {"private": port, "public": pod.host_ports[port], "type": kind, "ip": "127.0.0.1"}
                for port, kind in pod.private_ports()
                if port in pod.host_ports
            ],
        }
    return {
        "id": pod.id,
        "name": pod.name,
        "status": status,
        "actions": ACTIONS[status],
        "image": pod.image,
        "args": pod.docker_args,
        "disk": pod.container_disk_gb,
        "mounts": mounts,
        "ports": [f"{port}/{kind}" for port, kind in pod.private_ports()],
        "env": dict(pod.env),
        "gpu": {"id": pod.gpu_type_id, "count": pod.gpu_count},
        "cloud": pod.cloud,
        "dataCenterId": data_center,
        "cudaVersion": CUDA_VERSION,
        "ssh": {"proxy": None, "direct": None},
        "cost": 0 if status == "EXITED" else pod.cost_per_hr,
        "locked": False,
        "runtime": runtime,
        "createdAt": _iso(pod.created_at),
        "startedAt": _iso(pod.running_at or pod.started_at),
    }


def create_errors(body: Any) -> list[str]:
    """Schema violations of a CreatePodRequest (each a 422 message); empty when the body is valid."""
    if not isinstance(body, dict):
        return ["The body must be a JSON object."]
    errors = [f"Unknown field '{name}'." for name in sorted(set(body) - CREATE_FIELDS)]
    if not isinstance(body.get("name"), str):
        errors.append("'name' is required and must be a string.")
    if not isinstance(body.get("image"), str) and "templateId" not in body:
        errors.append("'image' is required unless 'templateId' is given.")
    gpu = body.get("gpu")
    if gpu is not None:
        if not isinstance(gpu, dict) or not isinstance(gpu.get("id"), str):
            errors.append("'gpu.id' is required and must be a string.")
        else:
            errors += [f"Unknown field 'gpu.{name}'." for name in sorted(set(gpu) - GPU_FIELDS)]
            if not isinstance(gpu.get("count", 1), int):
                errors.append("'gpu.count' must be an integer.")
    if body.get("cloud", "SECURE") not in ("SECURE", "COMMUNITY"):
        errors.append("'cloud' must be SECURE or COMMUNITY.")
    typed = {"ports": list, "dataCenterIds": list, "env": dict, "args": str, "disk": int, "mounts": dict}
    errors += [
        f"'{name}' has the wrong type." for name, kind in typed.items() if not isinstance(body.get(name, kind()), kind)
    ]
    if isinstance(body.get("env"), dict) and not all(isinstance(v, str) for v in body["env"].values()):
        errors.append("'env' values must be strings.")
    return errors


def graphql_input(body: dict[str, Any]) -> dict[str, Any]:
    """A valid CreatePodRequest as the input of the emulator's ``podFindAndDeployOnDemand``."""
    mounts = body.get("mounts") or {}
    persistent = mounts.get("persistent") or {}
    network = (mounts.get("network") or [{}])[0]
    return {
        "name": body["name"],
        "imageName": body.get("image") or "",
        "gpuTypeId": body["gpu"]["id"],
        "gpuCount": body["gpu"].get("count", 1),
        "cloudType": body.get("cloud", "SECURE"),
        "env": [{"key": k, "value": v} for k, v in (body.get("env") or {}).items()],
        "dockerArgs": body.get("args") or "",
        "ports": ",".join(body.get("ports") or []),
        "containerDiskInGb": body.get("disk"),
        "volumeInGb": persistent.get("size"),
        "volumeMountPath": persistent.get("path") or network.get("path"),
        "networkVolumeId": network.get("volumeId"),
    }


class RestHandler(web.RequestHandler):
    """What every ``/v2`` route shares: the request log, Bearer auth, the rate budget, faults, problem+json."""

    #: The name faults use for this route (``replies[].field``) and the request log's ``fields``.
    route = "rest"

    def initialize(self, emulator: Emulator, state: RestState) -> None:
        self.emulator = emulator
        self.state = state
        self.entry: dict[str, Any] = {}

    async def prepare(self) -> None:
        em = self.emulator
        self.entry = {"time": time.time(), "fields": [self.route], "method": self.request.method}
        self.entry["path"] = self.request.uri
        em.requests.append(self.entry)
        if self.request.headers.get("Authorization") != f"Bearer {em.api_key}":
            self.problem(401, FAULT_DETAILS[401])
            return
        with em.lock:
            left, reset_seconds = self.state.spend()
            quota = self.state.quota_per_minute
        self.set_header("RateLimit", f'"minute";r={max(left, 0)};t={reset_seconds}')
        self.set_header("RateLimit-Policy", f'"minute";q={quota};w=60')
        if left < 0:
            self.set_header("Retry-After", str(reset_seconds))
            self.problem(429, FAULT_DETAILS[429])
            return
        fault = em.take_fault([self.route])
        if fault is None:
            return
        self.entry["fault"] = fault.status or "delay"
        if fault.delay_seconds:
            await asyncio.sleep(fault.delay_seconds)
        if not fault.status:
            return
        if fault.body:
            self.set_status(fault.status)
            self.set_header("Content-Type", fault.content_type)
            self.finish(fault.body)
            return
        if fault.status == 429:
            self.set_header("Retry-After", str(self.state.retry_after_seconds))
        self.problem(fault.status, fault_detail(fault.status))

    def on_finish(self) -> None:
        self.entry["status"] = self.get_status()

    def problem(self, status: int, detail: str, errors: list[str] | None = None) -> None:
        """Finish with an RFC 9457 problem: ``{title, status, detail, errors?}``."""
        self.set_status(status)
        body: dict[str, Any] = {"title": self._reason, "status": status, "detail": detail}
        if errors:
            body["errors"] = errors
        self.set_header("Content-Type", "application/problem+json")
        self.finish(json.dumps(body))

    def reply(self, body: Any, status: int = 200) -> None:
        """Finish with a JSON body."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def visible_pod(self, pod_id: str) -> Pod | None:
        """The pod, unless it is unknown or its late create has not landed yet (call with the lock held)."""
        pod = self.emulator.pods.get(pod_id)
        return pod if pod is not None and self.state.visible(pod_id) else None

    def rest_pod(self, pod: Pod) -> dict[str, Any]:
        """``pod`` in REST v2's shape (call with the lock held)."""
        return pod_to_rest(pod, self.state.data_centers.get(pod.id, DATA_CENTERS[0]))

    async def in_pool(self, call: Any, *args: Any) -> Any:
        """Run one of the emulator's blocking methods (docker calls) on its worker threads."""
        return await asyncio.get_running_loop().run_in_executor(self.emulator.pool, call, *args)


class PodsHandler(RestHandler):
    """``GET /v2/pods`` (``{"pods": [...]}``; query parameters are ignored, as RunPod's are but one) and ``POST
    /v2/pods`` (one GPU type, one data centre among the preferred ones, no fallback; no capacity is a 400)."""

    async def prepare(self) -> None:
        self.route = "rest:create" if self.request.method == "POST" else "rest:list"
        await super().prepare()

    def get(self) -> None:
        em = self.emulator
        with em.lock:
            pods = [self.rest_pod(p) for p in em.pods.values() if self.state.visible(p.id)]
        self.reply({"pods": pods})

    async def post(self) -> None:
        try:
            body = json.loads(self.request.body)
        except ValueError:
            self.problem(400, "The body is not valid JSON.")
            return
        errors = create_errors(body)
        if errors:
            self.problem(422, "The request body does not match the schema.", errors)
            return
        if "gpu" not in body:
            self.problem(400, "The emulator creates GPU pods only; CPU and template pods are not emulated.")
            return
        gpu_id = body["gpu"]["id"]
        with self.emulator.lock:
            known = gpu_id in self.emulator.gpu_types
            wanted = body.get("dataCenterIds") or list(DATA_CENTERS)
            free = [dc for dc in wanted if (gpu_id, dc) not in self.state.no_capacity_dc]
            late = self.state.take_late_create()
        if not known:
            self.problem(400, f"'{gpu_id}' is not a GPU type.")
            return
        if not free:
            self.problem(400, NO_CAPACITY)
            return
        if late is not None and late.status != 201:
            asyncio.get_running_loop().call_later(late.land_after_seconds, self._land, body, free[0])
            await asyncio.sleep(late.delay_seconds)
            self.problem(late.status, fault_detail(late.status))
            return
        pod = self._land(body, free[0], late.land_after_seconds if late else 0.0)
        if pod is None:
            self.problem(400, NO_CAPACITY)
            return
        if late is not None and late.delay_seconds:
            await asyncio.sleep(late.delay_seconds)
        self.reply(pod, 201)

    def _land(self, body: dict[str, Any], data_center: str, hidden_seconds: float = 0.0) -> dict[str, Any] | None:
        """Create the pod through the emulator (None when its clouds have no capacity)."""
        em = self.emulator
        try:
            created = em.podFindAndDeployOnDemand(None, graphql_input(body))
        except ValueError:
            return None
        with em.lock:
            self.state.data_centers[created["id"]] = data_center
            if hidden_seconds:
                self.state.hidden_until[created["id"]] = time.time() + hidden_seconds
            return self.rest_pod(em.pods[created["id"]])


class PodHandler(RestHandler):
    """``GET /v2/pods/{id}`` (404 when unknown) and ``DELETE /v2/pods/{id}`` (204; 404 when unknown)."""

    async def prepare(self) -> None:
        self.route = "rest:delete" if self.request.method == "DELETE" else "rest:get"
        await super().prepare()

    def get(self, pod_id: str) -> None:
        with self.emulator.lock:
            pod = self.visible_pod(pod_id)
            body = self.rest_pod(pod) if pod else None
        if body is None:
            self.problem(404, FAULT_DETAILS[404])
        else:
            self.reply(body)

    async def delete(self, pod_id: str) -> None:
        with self.emulator.lock:
            pod = self.visible_pod(pod_id)
        if pod is None:
            self.problem(404, FAULT_DETAILS[404])
            return
        await self.in_pool(self.emulator.podTerminate, None, {"podId": pod_id})
        self.set_status(204)
        self.finish()


class PodActionHandler(RestHandler):
    """``POST /v2/pods/{id}/action`` ``{"action": "start|stop|restart|terminate"}``: 200 + the pod (terminate:
    204); 409 when the pod's ``actions`` do not list it; 400 when a start finds no GPUs on the host."""

    route = "rest:action"

    async def post(self, pod_id: str) -> None:
        em = self.emulator
        try:
            action = json.loads(self.request.body).get("action")
        except (ValueError, AttributeError):
            action = None
        if action not in ("start", "stop", "restart", "terminate"):
            self.problem(
                422,
                "The request body does not match the schema.",
                ["'action' must be start, stop, restart or terminate."],
            )
            return
        with em.lock:
            pod = self.visible_pod(pod_id)
            allowed = ACTIONS[pod_status(pod)] if pod else []
        if pod is None:
            self.problem(404, FAULT_DETAILS[404])
            return
        if action not in allowed:
            self.problem(409, f"A pod in status {pod_status(pod)} cannot {action}; it allows {', '.join(allowed)}.")
            return
        if action == "terminate":
            await self.in_pool(em.podTerminate, None, {"podId": pod_id})
            self.set_status(204)
            self.finish()
            return
        try:
            if action in ("stop", "restart"):
                await self.in_pool(em.podStop, None, {"podId": pod_id})
            if action in ("start", "restart"):
                await self.in_pool(em.podResume, None, {"podId": pod_id})
        except ValueError as e:
            self.problem(400, str(e))
            return
        with em.lock:
            body = self.rest_pod(pod)
        self.reply(body)


class PodLogsHandler(RestHandler):
    """``GET /v2/pods/{id}/logs?tail=N``: the pod's log as server-sent events, one ``data:`` line each, then the
    end of the stream (the lines set with ``/_emulator/rest/logs``, or the container's own log)."""

    route = "rest:logs"

    async def get(self, pod_id: str) -> None:
        em = self.emulator
        with em.lock:
            pod = self.visible_pod(pod_id)
            lines = list(self.state.logs.get(pod_id, []))
        if pod is None:
            self.problem(404, FAULT_DETAILS[404])
            return
        engine = em.docker
        if not lines and pod.container_id and engine is not None:
            raw = await self.in_pool(lambda: engine.containers.get(pod.container_id).logs(tail=1000))
            lines = raw.decode(errors="replace").splitlines()
        tail = int(self.get_argument("tail", "0") or 0)
        if tail > 0:
            lines = lines[-tail:]
        self.set_header("Content-Type", "text/event-stream")
        self.finish("".join(f"data: {line}\n\n" for line in lines))


class CatalogHandler(RestHandler):
    """``GET /v2/catalog/gpus[/{id}]``: the emulator's GPU types with list prices; ``include=AVAILABILITY``
    (which needs ``product=POD``) adds availability overall and per data centre, from the no-capacity faults."""

    route = "rest:catalog"

    def get(self, gpu_id: str | None = None) -> None:
        em = self.emulator
        include = self.get_argument("include", "")
        if include == "AVAILABILITY" and self.get_argument("product", "") != "POD":
            self.problem(400, "include=AVAILABILITY requires product=POD.")
            return
        count = int(self.get_argument("count", "1") or 1)
        clouds = [self.get_argument("cloud")] if self.get_argument("cloud", "") else ["SECURE", "COMMUNITY"]
        with em.lock:
            gpus = [self._gpu(g, include == "AVAILABILITY", count, clouds) for g in em.gpu_types.values()]
        if gpu_id is None:
            self.reply({"gpus": gpus})
            return
        found = [g for g in gpus if g["id"] == unquote(gpu_id)]
        if found:
            self.reply(found[0])
        else:
            self.problem(404, f"'{unquote(gpu_id)}' is not a GPU type.")

    def _gpu(self, gpu: dict[str, Any], availability: bool, count: int, clouds: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": gpu["id"],
            "name": gpu["displayName"],
            "memory": gpu["memoryInGb"],
            "secure": True,
            "community": True,
            "price": {"secure": gpu["securePrice"], "community": gpu["communityPrice"]},
            "maxCount": 8,
        }
        if not availability:
            return out
        cloud_free = count <= 8 and any((gpu["id"], c) not in self.emulator.no_capacity for c in clouds)
        level = self.state.availability.get(gpu["id"], "HIGH")
        per_dc = [
            {
                "id": dc,
                "availability": level if cloud_free and (gpu["id"], dc) not in self.state.no_capacity_dc else "NONE",
            }
            for dc in DATA_CENTERS
        ]
        overall = level if any(d["availability"] != "NONE" for d in per_dc) else "NONE"
        cuda = [{"version": CUDA_VERSION, "available": overall != "NONE"}]
        return {**out, "availability": overall, "dataCenters": per_dc, "cudaVersions": cuda}


class RestControlHandler(web.RequestHandler):
    """``POST /_emulator/rest/<what>``, the REST-only controls (``/_emulator/reset`` does not touch them):

    - ``settings``: ``no_capacity_dc=[[gpu_id, dc], ...]``, ``availability={gpu_id: "LOW"}``,
      ``quota_per_minute=N`` (the ``RateLimit`` budget; past it, 429), ``retry_after_seconds=s`` (a 429 fault's);
    - ``late-create``: the next create lands late, see :class:`LateCreate` (``land_after_seconds``, ``status``,
      ``delay_seconds``, ``times``);
    - ``logs``: ``{"pod_id": id, "lines": [...]}``, what ``/v2/pods/{id}/logs`` answers in record mode;
    - ``reset``: all of the above back to none, and a fresh rate window.
    """

    def initialize(self, emulator: Emulator, state: RestState) -> None:
        self.emulator = emulator
        self.state = state

    def post(self, what: str) -> None:
        body = json.loads(self.request.body or b"{}")
        st = self.state
        with self.emulator.lock:
            if what == "settings":
                if "no_capacity_dc" in body:
                    st.no_capacity_dc = {(gpu, dc) for gpu, dc in body["no_capacity_dc"]}
                st.availability = body.get("availability", st.availability)
                st.quota_per_minute = int(body.get("quota_per_minute", st.quota_per_minute))
                st.retry_after_seconds = int(body.get("retry_after_seconds", st.retry_after_seconds))
            elif what == "late-create":
                st.late_creates.append(LateCreate(**body))
            elif what == "logs":
                st.logs[body["pod_id"]] = list(body["lines"])
            elif what == "reset":
                fresh = RestState()
                fresh.data_centers = st.data_centers  # the pods stay, so do their data centres
                st.__dict__.update(fresh.__dict__)
            else:
                raise web.HTTPError(404)
        self.finish({"ok": True})


def rest_routes(emulator: Emulator) -> list[tuple[str, type[web.RequestHandler], dict[str, Any]]]:
    """The ``/v2`` routes and their controls, sharing one :class:`RestState`, for ``make_app``."""
    args = {"emulator": emulator, "state": RestState()}
    return [
        (r"/v2/pods", PodsHandler, args),
        (r"/v2/pods/([^/]+)", PodHandler, args),
        (r"/v2/pods/([^/]+)/action", PodActionHandler, args),
        (r"/v2/pods/([^/]+)/logs", PodLogsHandler, args),
        (r"/v2/catalog/gpus", CatalogHandler, args),
        (r"/v2/catalog/gpus/([^/]+)", CatalogHandler, args),
        (r"/_emulator/rest/([a-z-]+)", RestControlHandler, args),
    ]
