"""An emulator of RunPod's GraphQL API that runs each pod as a real container on a Docker engine.

It speaks what the runpod SDK 1.12.0 sends (``POST /graphql``, body ``{"query": ...}``, ``Authorization: Bearer
<key>``) and answers as RunPod does: ``{"data": ...}``, ``{"errors": [{"message": ...}]}`` (HTTP 200), 401 for a
wrong key. Documents are parsed and validated by graphql-core against :data:`schema.SCHEMA_SDL`, so a document the
SDK would break (an unescaped quote in a pasted value) fails here as it would there.

Pods: ``podFindAndDeployOnDemand`` records the pod (``desiredStatus`` RUNNING at once, ``runtime`` null), waits the
simulated boot time, then runs the requested image on the engine with the given env and ``dockerArgs`` as its
command, publishing each port of ``ports`` on 127.0.0.1. ``runtime`` appears only while the container runs; its
``ports`` list, per private port, ``ip`` 127.0.0.1 and the published host port as ``publicPort`` (a proxy URL
template ``http://{ip}:{public_port}`` reaches it, as ``https://{pod_id}-{port}.proxy.runpod.net`` does at RunPod).
``podStop`` stops the container (the pod keeps stale runtime ports, as RunPod's EXITED pods may), ``podResume``
starts it again, ``podTerminate`` removes it and forgets the pod.

A control API under ``/_emulator/`` lets tests inject faults and read what was asked (see :mod:`.client`).
Start it with ``python -m tests.runpod_emulator --port N [--docker-host URL | --no-docker]`` (:mod:`.client` does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import docker
import docker.errors
import graphql
from tornado import web

from .schema import DEFAULT_GPU_TYPES, GENERIC, NO_CAPACITY, NO_GPUS_ON_HOST, SCHEMA_SDL

log = logging.getLogger("runpod-emulator")

#: Every container the emulator runs carries this label, its value the emulator's instance name.
LABEL = "dolab.runpod-emulator"
CLOUDS = ("SECURE", "COMMUNITY")
_ID_CHARS = string.ascii_lowercase + string.digits


@dataclass
class Pod:
    """One pod as the emulator keeps it."""

    id: str
    name: str
    image: str
    gpu_type_id: str
    gpu_count: int
    cloud: str
    cost_per_hr: float
    env: dict[str, str]
    docker_args: str
    ports: str
    container_disk_gb: int | None
    volume_gb: int | None
    volume_mount_path: str | None
    network_volume_id: str | None
    desired_status: str = "RUNNING"
    last_status_change: str = ""
    container_id: str = ""
    container_running: bool = False
    host_ports: dict[int, int] = field(default_factory=dict)
    started_at: float = 0.0
    problem: str = ""
    boots: int = 0
    created_at: float = 0.0  # unix time the create arrived
    running_at: float = 0.0  # unix time the container last started running

    def private_ports(self) -> list[tuple[int, str]]:
        """``"8888/http,22/tcp"`` -> [(8888, "http"), (22, "tcp")]."""
        out = []
        for item in filter(None, self.ports.split(",")):
            number, _, kind = item.partition("/")
            out.append((int(number), kind or "tcp"))
        return out

    def to_graphql(self) -> dict[str, Any]:
        """The pod as RunPod's ``Pod`` type."""
        runtime = None
        # Stale runtime ports on an EXITED pod: RunPod may report them too.
        if self.host_ports and (self.container_running or self.desired_status == "EXITED"):
            runtime = {
                "uptimeInSeconds": int(time.time() - self.started_at) if self.container_running else 0,
                "ports": [
                    {
                        "ip": "127.0.0.1",
                        "isIpPublic": kind == "tcp",
                        "privatePort": port,
                        "publicPort": self.host_ports[port],
                        "type": kind,
                    }
                    for port, kind in self.private_ports()
                    if port in self.host_ports
                ],
            }
        return {
            "id": self.id,
            "name": self.name,
            "imageName": self.image,
            "desiredStatus": self.desired_status,
            "costPerHr": self.cost_per_hr,
            "gpuCount": self.gpu_count,
            "env": [f"{k}={v}" for k, v in self.env.items()],
            "dockerArgs": self.docker_args,
            "dockerId": self.container_id[:12] or None,
            "containerDiskInGb": self.container_disk_gb,
            "volumeInGb": self.volume_gb,
            "volumeMountPath": self.volume_mount_path,
            "ports": self.ports,
            "port": None,
            "podType": "RESERVED",
            "lastStatusChange": self.last_status_change,
            "machineId": f"machine-{self.id[:6]}",
            "memoryInGb": 62.0,
            "vcpuCount": 8.0,
            "uptimeSeconds": 0,  # RunPod's is always 0 (the real one is runtime.uptimeInSeconds)
            "runtime": runtime,
            "machine": {"gpuDisplayName": self.gpu_type_id, "podHostId": f"{self.id}-64410"},
        }


@dataclass
class Fault:
    """A reply the next matching request(s) get instead of the real one."""

    field: str | None  # a top-level field ("podFindAndDeployOnDemand", "pod", "gpuTypes"...); None: any
    times: int
    status: int = 0  # 0: answer normally (after the delay)
    body: str = ""
    content_type: str = "application/json"
    delay_seconds: float = 0.0


class Emulator:
    """The emulated account: GPU types, pods, faults, the request log and the containers."""

    def __init__(self, api_key: str, docker_host: str | None, instance: str) -> None:
        self.api_key = api_key
        self.instance = instance
        self.lock = threading.RLock()
        self.pods: dict[str, Pod] = {}
        self.gpu_types = {g["id"]: dict(g) for g in DEFAULT_GPU_TYPES}
        self.no_capacity: set[tuple[str, str]] = set()
        self.resume_fails = False
        self.boot_seconds = 0.0
        self.faults: list[Fault] = []
        self.requests: list[dict[str, Any]] = []
        self.network_volumes = [{"id": "netvol-test", "name": "datasets", "size": 50, "dataCenterId": "EU-RO-1"}]
        self.docker = docker.DockerClient(base_url=docker_host, timeout=60) if docker_host else None
        self.pool = ThreadPoolExecutor(16, thread_name_prefix="runpod-emulator")
        self.schema = graphql.build_schema(SCHEMA_SDL)
        self._stopping = threading.Event()
        if self.docker is not None:
            threading.Thread(target=self._watch_containers, daemon=True).start()

    # ----- GraphQL root fields ------------------------------------------------------------------------

    def myself(self, info: Any) -> dict[str, Any]:
        with self.lock:
            pods = [p.to_graphql() for p in self.pods.values()]
        return {"id": "user-emulated", "pubKey": "", "networkVolumes": self.network_volumes, "pods": pods}

    def pod(self, info: Any, input: dict[str, Any]) -> dict[str, Any] | None:
        with self.lock:
            found = self.pods.get(input["podId"])
            return found.to_graphql() if found else None

    def gpuTypes(self, info: Any, input: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        wanted = (input or {}).get("id")
        out = []
        with self.lock:
            for gpu in self.gpu_types.values():
                if wanted is not None and gpu["id"] != wanted:
                    continue
                out.append(self._gpu_type(gpu))
        return out

    def _gpu_type(self, gpu: dict[str, Any]) -> dict[str, Any]:
        secure, community = gpu["securePrice"], gpu["communityPrice"]

        def lowest_price(info: Any, input: dict[str, Any] | None = None) -> dict[str, float]:
            return {"minimumBidPrice": round(community * 0.6, 2), "uninterruptablePrice": min(secure, community)}

        return {
            **gpu,
            "manufacturer": "Nvidia",
            "cudaCores": 0,
            "maxGpuCount": 8,
            "secureCloud": True,
            "communityCloud": True,
            "oneMonthPrice": secure * 0.9,
            "threeMonthPrice": secure * 0.85,
            "oneWeekPrice": secure * 0.95,
            "communitySpotPrice": round(community * 0.6, 2),
            "secureSpotPrice": round(secure * 0.6, 2),
            "lowestPrice": lowest_price,
        }

    def podFindAndDeployOnDemand(self, info: Any, input: dict[str, Any]) -> dict[str, Any]:
        gpu_id = input.get("gpuTypeId")
        with self.lock:
            gpu = self.gpu_types.get(gpu_id or "")
            if gpu is None:
                raise ValueError(GENERIC)
            wanted = CLOUDS if input.get("cloudType", "ALL") == "ALL" else (input["cloudType"],)
            clouds = [c for c in wanted if (gpu_id, c) not in self.no_capacity]
            if not clouds:
                raise ValueError(NO_CAPACITY)
            cloud = min(clouds, key=lambda c: gpu["securePrice" if c == "SECURE" else "communityPrice"])
            price = gpu["securePrice" if cloud == "SECURE" else "communityPrice"]
            count = int(input.get("gpuCount") or 1)
            pod = Pod(
                id="".join(secrets.choice(_ID_CHARS) for _ in range(14)),
                name=input.get("name") or "",
                image=input.get("imageName") or "",
                gpu_type_id=gpu_id or "",
                gpu_count=count,
                cloud=cloud,
                cost_per_hr=round(price * count, 3),
                env={e["key"]: e["value"] for e in input.get("env") or []},
                docker_args=input.get("dockerArgs") or "",
                ports=input.get("ports") or "",
                container_disk_gb=input.get("containerDiskInGb"),
                volume_gb=input.get("volumeInGb"),
                volume_mount_path=input.get("volumeMountPath"),
                network_volume_id=input.get("networkVolumeId"),
                last_status_change=_now(),
                created_at=time.time(),
            )
            self.pods[pod.id] = pod
            boot_seconds = self.boot_seconds
        log.info("pod %s (%r) created: %s x%d on %s cloud", pod.id, pod.name, gpu_id, count, cloud)
        self.pool.submit(self._boot, pod.id, boot_seconds)
        reply = pod.to_graphql()
        return {**reply, "machine": {"podHostId": reply["machine"]["podHostId"]}}

    def podStop(self, info: Any, input: dict[str, Any]) -> dict[str, Any]:
        pod = self._pod_or_error(input["podId"])
        if pod.container_id and self.docker is not None:
            try:
                self.docker.containers.get(pod.container_id).stop(timeout=5)
            except docker.errors.NotFound:
                pass
        with self.lock:
            pod.desired_status = "EXITED"
            pod.container_running = False
            pod.last_status_change = _now()
        return {"id": pod.id, "desiredStatus": "EXITED"}

    def podResume(self, info: Any, input: dict[str, Any]) -> dict[str, Any]:
        pod = self._pod_or_error(input["podId"])
        if self.resume_fails:
            raise ValueError(NO_GPUS_ON_HOST)
        with self.lock:
            pod.desired_status = "RUNNING"
            pod.last_status_change = _now()
            boot_seconds = self.boot_seconds
        self.pool.submit(self._boot, pod.id, boot_seconds)
        return {**pod.to_graphql(), "machine": {"podHostId": f"{pod.id}-64410"}}

    def podTerminate(self, info: Any, input: dict[str, Any]) -> None:
        pod = self._pod_or_error(input["podId"])
        self._remove(pod)
        log.info("pod %s terminated", pod.id)
        return None

    def _pod_or_error(self, pod_id: str) -> Pod:
        with self.lock:
            pod = self.pods.get(pod_id)
        if pod is None:
            raise ValueError(GENERIC)
        return pod

    # ----- containers ---------------------------------------------------------------------------------

    def _boot(self, pod_id: str, boot_seconds: float) -> None:
        """The simulated boot (image pull, scheduling), then the container."""
        time.sleep(boot_seconds)
        with self.lock:
            pod = self.pods.get(pod_id)
            if pod is None or pod.desired_status != "RUNNING":
                return
            pod.boots += 1
        if self.docker is None:
            with self.lock:
                pod.container_running, pod.started_at = True, time.time()
                pod.host_ports = {port: 40000 + i for i, (port, _) in enumerate(pod.private_ports())}
            return
        try:
            if pod.container_id:
                container = self.docker.containers.get(pod.container_id)
                container.start()
            else:
                container = self.docker.containers.run(
                    pod.image,
                    command=pod.docker_args or None,
                    environment=pod.env,
                    name=f"runpod-emu-{pod.id}",
                    labels={LABEL: self.instance, "runpod.pod-id": pod.id, "runpod.pod-name": pod.name[:200]},
                    ports={f"{port}/tcp": ("127.0.0.1", None) for port, _ in pod.private_ports()},
                    detach=True,
                )
            container.reload()
        except docker.errors.ImageNotFound:
            # At RunPod a pod whose image cannot be pulled stays RUNNING without a runtime, retrying the pull.
            with self.lock:
                pod.problem = f"image {pod.image} not found"
            log.warning("pod %s: image %s not found; it never starts", pod.id, pod.image)
            return
        except docker.errors.DockerException as e:
            with self.lock:
                pod.problem = str(e)
            log.warning("pod %s: container failed: %s", pod.id, e)
            return
        published = container.attrs["NetworkSettings"]["Ports"] or {}
        with self.lock:
            if pod_id not in self.pods:  # terminated while it started
                container.remove(force=True)
                return
            pod.container_id = container.id
            pod.host_ports = {
                int(key.split("/")[0]): int(binding[0]["HostPort"]) for key, binding in published.items() if binding
            }
            pod.container_running = container.status == "running"
            pod.started_at = pod.running_at = time.time()
        log.info("pod %s: container %s running, ports %s", pod.id, container.short_id, pod.host_ports)

    def _watch_containers(self) -> None:
        """Follow the containers' real state (a container that exited is a pod without runtime)."""
        assert self.docker is not None
        while not self._stopping.wait(0.3):
            try:
                running = {
                    c.id
                    for c in self.docker.containers.list(filters={"label": f"{LABEL}={self.instance}"})
                    if c.status == "running"
                }
            except docker.errors.DockerException:
                continue
            with self.lock:
                for pod in self.pods.values():
                    if pod.container_id:
                        pod.container_running = pod.container_id in running and pod.desired_status == "RUNNING"

    def _remove(self, pod: Pod) -> None:
        with self.lock:
            self.pods.pop(pod.id, None)
        if self.docker is not None:
            for container in self.docker.containers.list(all=True, filters={"label": f"runpod.pod-id={pod.id}"}):
                container.remove(force=True)

    def vanish(self, pod_id: str) -> bool:
        """The pod disappears (host failure, or deleted in RunPod's console)."""
        with self.lock:
            pod = self.pods.get(pod_id)
        if pod is None:
            return False
        self._remove(pod)
        log.info("pod %s vanished", pod_id)
        return True

    def remove_all(self) -> None:
        """Terminate every pod (end of the tests)."""
        with self.lock:
            pods = list(self.pods.values())
        for pod in pods:
            self._remove(pod)
        if self.docker is not None:
            for container in self.docker.containers.list(all=True, filters={"label": f"{LABEL}={self.instance}"}):
                container.remove(force=True)

    # ----- requests -----------------------------------------------------------------------------------

    def take_fault(self, fields: list[str]) -> Fault | None:
        """The first fault that matches one of the request's top-level fields, used once."""
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and (fault.field is None or fault.field in fields):
                    fault.times -= 1
                    return fault
        return None

    def execute(self, document: graphql.DocumentNode) -> dict[str, Any]:
        """Run a parsed document (blocking: docker calls happen in resolvers)."""
        errors = graphql.validate(self.schema, document)
        if errors:
            return {"errors": [{"message": e.message} for e in errors]}
        result = graphql.execute_sync(self.schema, document, root_value=self)
        body: dict[str, Any] = {"data": result.data}
        if result.errors:
            body["errors"] = [{"message": e.message, "path": e.path} for e in result.errors]
        return body

    def stop(self) -> None:
        """End the watcher and the worker threads."""
        self._stopping.set()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _top_fields(document: graphql.DocumentNode) -> list[str]:
    fields = []
    for definition in document.definitions:
        if isinstance(definition, graphql.OperationDefinitionNode):
            fields += [s.name.value for s in definition.selection_set.selections if isinstance(s, graphql.FieldNode)]
    return fields


class GraphQLHandler(web.RequestHandler):
    """``POST /graphql``: RunPod's single endpoint."""

    def initialize(self, emulator: Emulator) -> None:
        self.emulator = emulator

    async def post(self) -> None:
        em = self.emulator
        entry: dict[str, Any] = {"time": time.time(), "fields": [], "status": 200}
        em.requests.append(entry)
        if self.request.headers.get("Authorization") != f"Bearer {em.api_key}":
            entry["status"] = 401
            self.set_status(401)
            self.finish("Unauthorized")
            return
        try:
            query = json.loads(self.request.body)["query"]
            entry["query"] = query
            document = graphql.parse(query)
        except (ValueError, KeyError, TypeError, graphql.GraphQLError) as e:
            entry["status"] = 400
            self.set_status(400)
            message = e.message if isinstance(e, graphql.GraphQLError) else f"Bad request body: {e}"
            self.finish({"errors": [{"message": message}]})
            return
        entry["fields"] = _top_fields(document)
        fault = em.take_fault(entry["fields"])
        if fault is not None:
            entry["fault"] = fault.status or "delay"
            if fault.delay_seconds:
                await asyncio.sleep(fault.delay_seconds)
            if fault.status:
                entry["status"] = fault.status
                self.set_status(fault.status)
                self.set_header("Content-Type", fault.content_type)
                self.finish(fault.body)
                return
        body = await asyncio.get_running_loop().run_in_executor(em.pool, em.execute, document)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))


class ControlHandler(web.RequestHandler):
    """``/_emulator/<what>``: what tests use to look inside and to inject faults."""

    def initialize(self, emulator: Emulator) -> None:
        self.emulator = emulator

    def get(self, what: str) -> None:
        em = self.emulator
        if what == "health":
            self.finish({"ok": True, "instance": em.instance})
        elif what == "requests":
            self.finish({"requests": em.requests})
        elif what == "pods":
            with em.lock:
                pods = [
                    {
                        **p.to_graphql(),
                        "cloud": p.cloud,
                        "containerId": p.container_id,
                        "containerRunning": p.container_running,
                        "hostPorts": {str(k): v for k, v in p.host_ports.items()},
                        "env": p.env,
                        "problem": p.problem,
                        "boots": p.boots,
                        "createdAt": p.created_at,
                        "runningAt": p.running_at,
                    }
                    for p in em.pods.values()
                ]
            self.finish({"pods": pods})
        else:
            raise web.HTTPError(404)

    async def post(self, what: str) -> None:
        em = self.emulator
        body = json.loads(self.request.body or b"{}")
        if what == "faults":
            with em.lock:
                if "no_capacity" in body:
                    em.no_capacity = {(gpu, cloud) for gpu, cloud in body["no_capacity"]}
                if "boot_seconds" in body:
                    em.boot_seconds = float(body["boot_seconds"])
                if "resume_fails" in body:
                    em.resume_fails = bool(body["resume_fails"])
                for raw in body.get("replies", []):
                    em.faults.append(
                        Fault(
                            field=raw.get("field"),
                            times=int(raw.get("times", 1)),
                            status=int(raw.get("status", 0)),
                            body=raw.get("body", ""),
                            content_type=raw.get("content_type", "application/json"),
                            delay_seconds=float(raw.get("delay_seconds", 0)),
                        )
                    )
        elif what == "prices":
            with em.lock:
                for gpu_id, prices in body.items():
                    em.gpu_types[gpu_id].update(prices)
        elif what == "reset":
            with em.lock:
                em.no_capacity = set()
                em.boot_seconds = 0.0
                em.resume_fails = False
                em.faults = []
                em.requests.clear()
                em.gpu_types = {g["id"]: dict(g) for g in DEFAULT_GPU_TYPES}
        elif what == "vanish":
            if not await asyncio.get_running_loop().run_in_executor(em.pool, em.vanish, body["pod_id"]):
                raise web.HTTPError(404)
        elif what == "remove-all":
            await asyncio.get_running_loop().run_in_executor(em.pool, em.remove_all)
        else:
            raise web.HTTPError(404)
        self.finish({"ok": True})


def make_app(emulator: Emulator) -> web.Application:
    """The tornado application serving the GraphQL endpoint, REST v2 (:mod:`.rest`) and the control API."""
    from .rest import rest_routes  # here: rest.py builds on this module's Emulator

    return web.Application(
        [
            (r"/graphql", GraphQLHandler, {"emulator": emulator}),
            (r"/_emulator/([a-z-]+)", ControlHandler, {"emulator": emulator}),
            *rest_routes(emulator),
        ]
    )


async def serve(port: int, api_key: str, docker_host: str | None, instance: str) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM."""
    emulator = Emulator(api_key, docker_host, instance)
    server = make_app(emulator).listen(port, address="127.0.0.1")
    log.info("RunPod emulator %s on http://127.0.0.1:%d (docker: %s)", instance, port, docker_host or "off")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
    await loop.run_in_executor(None, emulator.remove_all)
    emulator.stop()


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m tests.runpod_emulator --port N [--docker-host URL | --no-docker]``; the key that
    requests must carry comes from ``$RUNPOD_EMULATOR_API_KEY`` (or ``--api-key``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    key = os.environ.get("RUNPOD_EMULATOR_API_KEY", "")
    parser.add_argument("--api-key", default=key, help="the key requests must carry (or $RUNPOD_EMULATOR_API_KEY)")
    parser.add_argument("--docker-host", default="unix:///var/run/docker.sock")
    parser.add_argument("--no-docker", action="store_true", help="pods are records only (adapter unit tests)")
    parser.add_argument("--instance", default="runpod-emulator")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args.port, args.api_key, None if args.no_docker else args.docker_host, args.instance))
