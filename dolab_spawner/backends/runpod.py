"""The runpod backend: one RunPod pod per server, rented only while the server runs (``backend: runpod``).

A profile names GPU types in order of preference, a GPU count, a cloud type, an image and disks, and a maximum
price per hour (see :class:`~dolab_spawner.profiles.RunPodOffer`). ``start()`` tries each GPU type (and for cloud
type ``all``, the secure then the community cloud) at or below the price cap until RunPod has capacity, then polls
the pod with backoff until it runs with its HTTP port listed, and returns the proxy URL of that port. Whatever
happens, a start that fails or is cancelled terminates the pod it created: no pod keeps billing.

The pod runs ``jupyterhub-singleuser`` with the hub's ``JUPYTERHUB_*`` variables, the API URL at
``hub_connect_url`` (a public https address the pod can reach) and the server's own token; nothing of the hub's
environment (the RunPod key least of all) goes in. All RunPod calls go through
:mod:`dolab_core.engines.runpod`; what to ask for and what is offered is :mod:`.runpod_offers`.

Pods are named ``<pod_name_prefix><hub id>-<escaped user>[--<server>]`` (the hub's id from
:mod:`dolab_core.hubidentity`), so a pod created before a hub crash is found again by name, and the reaper
(``dolab_services.reapers.runpod``) can tell which of this hub's pods no server owns, never touching another hub's.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from typing import TYPE_CHECKING, Any

from jupyterhub.spawner import Spawner, SpawnException
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from traitlets import Dict, Float, Integer, List, Unicode, default

from dolab_core.engines.runpod import (
    BadApiKey,
    GpuType,
    NoCapacity,
    PodSpec,
    RunPodError,
    TransientError,
    UnknownGpuType,
    hub_pod_prefix,
    pod_name,
)

from .base import Backend, ServerReadyHook, make_backend
from .runpod_account import RunPodSettings, api_failure
from .runpod_offers import cloud_word, offers_within_cap, pod_request, price_rows

if TYPE_CHECKING:
    from ..options import Selection
    from ..profiles import Profile
    from ..spawner import DoLabSpawner

__all__ = ["RunPodBackend"]

#: Variables GPU pinning sets for local GPUs; a pod's GPUs are all its own.
_LOCAL_GPU_VARS = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES")


class RunPodBackend(RunPodSettings, Backend, Spawner):
    """A single-user server in a RunPod pod (``backend: runpod``)."""

    #: RunPod GPUs are rented per pod, not taken from the hub's GPU slots.
    uses_gpu_slots = False

    # Set by DoLabSpawner.
    pod_request = Dict(help="What to rent: the selection's GPU types in order, count, cloud, image, price cap...")
    _ready_hooks: List[Any] = List()

    # State.
    _resumed = False
    pod_id = Unicode("")
    gpu_type_id = Unicode("")
    cloud_type = Unicode("")
    price_per_hour_usd = Float(0.0)
    gpu_count = Integer(0)

    @default("env_keep")
    def _default_env_keep(self) -> list[str]:
        return []  # a remote pod gets nothing of the hub's environment

    @default("ip")
    def _default_ip(self) -> str:
        return "0.0.0.0"

    @default("port")
    def _default_port(self) -> int:
        return int(self.http_port)

    @property
    def pod_name(self) -> str:
        """This server's pod name."""
        return pod_name(hub_pod_prefix(self.pod_name_prefix, self.hub_id), self.user.name, self.name)

    # ----- the backend interface -----------------------------------------------------------------------

    @classmethod
    def hosts(cls, spawner: DoLabSpawner) -> list[str]:
        """RunPod's machines are rented, not the hub's: one host, ``runpod``, with no slots."""
        return ["runpod"]

    @classmethod
    def hub_timeouts(cls, spawner: DoLabSpawner, selection: Selection) -> dict[str, float]:
        """``pod_start_timeout_seconds`` and ``pod_http_timeout_seconds``: a pod pulls its image first."""
        return {
            "start_timeout": float(cls.configured_value(spawner, selection, "pod_start_timeout_seconds")),
            "http_timeout": float(cls.configured_value(spawner, selection, "pod_http_timeout_seconds")),
        }

    @classmethod
    async def form_prices(cls, spawner: DoLabSpawner, profile: Profile) -> list[dict[str, Any]] | None:
        """Live prices per pod-hour of each GPU type the profile offers (cached by the adapter); None prices when
        RunPod cannot say."""
        assert profile.runpod is not None
        gpu_types = list(profile.runpod.gpu_types)
        backend = make_backend(spawner, cls)
        try:
            return await backend.offered_prices(gpu_types, profile.gpus, profile.runpod.cloud_type)
        except Exception:
            spawner.log.exception("Could not read RunPod prices for the form")
            return [{"id": g, "name": g, "price": None} for g in gpu_types]

    def configure(self, selection: Selection) -> None:
        """The profile's overrides, and what to rent (:func:`.runpod_offers.pod_request`)."""
        super().configure(selection)
        self.pod_request = pod_request(selection)

    @property
    def server_ready_hooks(self) -> list[ServerReadyHook]:
        """Run once the pod's server answers, before start() returns. The sync's restore of a new workspace
        registers here (``dolab_services.sync.remote_hooks``); a hook that raises fails the start (the pod is
        terminated)."""
        return self._ready_hooks

    def _emit(self, progress: int, message: str) -> None:
        self.log.info("%s: %s", self._log_name, message)
        if self.progress_callback is not None:
            self.progress_callback(progress, message)

    # ----- what the pod gets ---------------------------------------------------------------------------

    def get_env(self) -> dict[str, str]:
        """The hub's JUPYTERHUB_* variables (API URL at ``hub_connect_url``), the admin's ``environment``, the
        server's own token; no local GPU pinning (the pod's GPUs are all its own)."""
        env = super().get_env()
        for name in _LOCAL_GPU_VARS:
            env.pop(name, None)
        env["DOLAB_GPUS"] = ",".join([self.gpu_type_id] * max(self.gpu_count, 1)) if self.gpu_type_id else ""
        return env

    def docker_args(self) -> str:
        """The pod's start command, one shell-quoted string (RunPod's ``dockerArgs``)."""
        return shlex.join([*self.singleuser_command, *self.get_args()])

    def pod_spec(self, gpu_type_id: str, cloud_type: str) -> PodSpec:
        """What to ask RunPod for one attempt."""
        request = self.pod_request
        self.gpu_type_id = gpu_type_id
        self.gpu_count = int(request.get("gpu_count", 1))
        return PodSpec(
            name=self.pod_name,
            image=request["image"],
            gpu_type_id=gpu_type_id,
            gpu_count=self.gpu_count,
            cloud_type=cloud_type,
            container_disk_gb=int(request.get("container_disk_gb", 20)),
            volume_gb=int(request.get("volume_gb", 0)),
            volume_mount_path=request.get("volume_mount_path", "/workspace"),
            network_volume_id=request.get("network_volume_id", ""),
            ports=f"{self.http_port}/http",
            env=self.get_env(),
            docker_args=self.docker_args(),
        )

    # ----- start ---------------------------------------------------------------------------------------

    async def start(self) -> str:
        """Rent a pod (GPU types and clouds in order, within the price cap) and wait until its server port is up."""
        if not self.api_key:
            self.log.error("RunPod profile started but no RunPod API key is configured (RUNPOD_API_KEY)")
            raise SpawnException(
                "RunPod profiles are not set up on this hub. Please tell an administrator.",
                reason="runpod_config",
                status_code=503,
            )
        self.port = int(self.http_port)
        self._resumed = False
        try:
            if not await self._resume_stopped_pod():
                await self._create()
            return await self._wait_running()
        except BaseException:
            # Failed, or cancelled by the hub's start_timeout: no pod may keep billing. Shielded, so a second
            # cancellation cannot interrupt the cleanup.
            await asyncio.shield(asyncio.ensure_future(self._cleanup_failed_start()))
            raise

    async def _resume_stopped_pod(self) -> bool:
        """Deal with a pod of this name from before; True when it was resumed (and is this start's pod).

        A stopped pod (``stop_action = "stop"``, or ``suspend()`` after a failed workspace sync) holds the user's
        disk: it is resumed, with the token in its environment (the hub accepts a resumed server's token), if it
        runs the same image. A running one is the leftover of a start the hub lost (its token is stale): it is
        terminated. A stopped pod of another image is kept, and a new pod created beside it.
        """
        try:
            leftover = await self.api.find_pod(self.pod_name)
        except RunPodError as e:
            raise self._api_failure(e, "looking for an earlier pod") from None
        if leftover is None:
            return False
        if leftover.desired_status != "EXITED":
            self.log.warning("Terminating leftover pod %s (%s) before a new start", leftover.id, leftover.name)
            await self.api.terminate_pod(leftover.id)
            return False
        token = leftover.env.get("JUPYTERHUB_API_TOKEN", "")
        if leftover.image != self.pod_request.get("image") or not token:
            self.log.warning(
                "Keeping stopped pod %s (%s, image %s): it holds a disk; this start creates a new pod",
                leftover.id,
                leftover.name,
                leftover.image,
            )
            return False
        self._emit(35, "Resuming your stopped pod (its disk is kept)")
        try:
            await self.api.resume_pod(leftover.id, int(self.pod_request.get("gpu_count", 1)))
        except NoCapacity:
            self.log.warning(
                "Stopped pod %s cannot resume (no free GPU on its machine); creating a new pod", leftover.id
            )
            self._emit(36, "Your stopped pod's machine has no free GPU; starting a new pod (the stopped one is kept)")
            return False
        except RunPodError as e:
            raise self._api_failure(e, "resuming the stopped pod") from None
        self.pod_id, self._resumed = leftover.id, True
        self.api_token = token  # the server in the pod still has it; DoLabSpawner tells the hub
        self.price_per_hour_usd = leftover.cost_per_hr
        self.log.info("Pod %s of %s resumed", leftover.id, self._log_name)
        self._emit(50, "Pod resumed, starting")
        return True

    async def _offers(self) -> list[tuple[GpuType, str, float]]:
        """(GPU type, cloud, price per pod-hour) to try, in order; the refused ones are said in progress events."""
        request = self.pod_request
        count = int(request.get("gpu_count", 1))
        cap = float(request.get("max_price_per_hour") or 0)
        found: list[tuple[str, GpuType | None]] = []
        for gpu_id in request["gpu_types"]:
            try:
                found.append((gpu_id, await self.api.gpu_type(gpu_id, count)))
            except UnknownGpuType:
                self.log.error("RunPod does not know the GPU type %r of profile %s", gpu_id, request.get("profile"))
                found.append((gpu_id, None))
            except RunPodError as e:
                raise self._api_failure(e, "reading GPU prices") from None
        offers, refused = offers_within_cap(found, count, cap, request.get("cloud_type", "secure"))
        if not offers:
            cap_text = f" at or below ${cap:.2f} per hour" if cap else ""
            raise SpawnException(
                f"No GPU of this profile is offered{cap_text} right now ({'; '.join(refused) or 'none offered'}). "
                "Raise your maximum price or pick another profile.",
                reason="runpod_price",
                status_code=409,
            )
        return offers

    async def _create(self) -> None:
        offers = await self._offers()
        tried: list[str] = []
        for i, (gpu, cloud, price) in enumerate(offers):
            what = f"{gpu.display_name} on {cloud_word(cloud)} cloud"
            if i == 0:
                self._emit(35, f"Requesting {what} (${price:.2f}/h)")
            else:
                self._emit(35 + i, f"No capacity for {tried[-1]}, trying {what} (${price:.2f}/h)")
            try:
                self.pod_id = await self.api.create_pod(self.pod_spec(gpu.id, cloud))
            except NoCapacity:
                self.log.info("RunPod has no capacity for %s for %s", what, self._log_name)
                tried.append(what)
                continue
            except RunPodError as e:
                raise self._api_failure(e, "creating the pod") from None
            self.cloud_type = cloud
            self.price_per_hour_usd = price
            self.log.info(
                "Pod %s (%s) created for %s: %d x %s on %s cloud, $%.2f/h",
                self.pod_id,
                self.pod_name,
                self._log_name,
                self.gpu_count,
                gpu.id,
                cloud,
                price,
            )
            self._emit(50, "Pod scheduled, pulling image")
            return
        raise SpawnException(
            f"RunPod has no capacity for this profile right now. Tried: {', '.join(tried)}. "
            "Try again in a few minutes or pick another profile.",
            reason="runpod_capacity",
            status_code=503,
        )

    async def _wait_running(self) -> str:
        """Poll with backoff until the pod runs with its HTTP port listed; returns the proxy URL of that port."""
        interval = self.poll_interval_seconds
        started = time.monotonic()
        announced = False
        while True:
            try:
                pod = await self.api.get_pod(self.pod_id)
            except TransientError as e:
                # Retried already; the pod may be fine: keep waiting (start_timeout bounds it all).
                self.log.warning("Polling pod %s failed (%s); still waiting", self.pod_id, e)
                await asyncio.sleep(interval)
                continue
            except RunPodError as e:
                raise self._api_failure(e, "waiting for the pod") from None
            if pod is None:
                raise SpawnException(
                    "Your RunPod pod disappeared while starting. Please try again.",
                    reason="runpod_vanished",
                    status_code=503,
                )
            if pod.desired_status not in ("RUNNING", "CREATED", "RESTARTING"):
                raise SpawnException(
                    f"Your RunPod pod stopped while starting (status {pod.desired_status}). Please try again.",
                    reason="runpod_exited",
                    status_code=503,
                )
            if pod.cost_per_hr:
                self.price_per_hour_usd = pod.cost_per_hr
            port = pod.port(self.http_port)
            if port is not None:
                self._emit(80, "Server starting")
                url = self.proxy_url_template.format(
                    pod_id=pod.id, port=self.http_port, ip=port.ip, public_port=port.public_port
                )
                self.log.info(
                    "Pod %s of %s runs after %.1f s; server at %s",
                    pod.id,
                    self._log_name,
                    time.monotonic() - started,
                    url,
                )
                await self._wait_server(url)
                base_url = self.server.base_url if self.server is not None else "/"
                for hook in self._ready_hooks:
                    await hook(url.rstrip("/") + base_url, self.api_token)
                return url
            if pod.running and not announced:
                self._emit(70, "Pod running, waiting for its server port")
                announced = True
            self.log.debug("Pod %s not running yet; next look in %.1f s", self.pod_id, interval)
            await asyncio.sleep(interval)
            interval = min(interval * 1.25, self.poll_max_interval_seconds)

    async def _pod_gone(self) -> bool:
        """Whether the pod is missing or no longer running (an API failure says nothing: False)."""
        try:
            pod = await self.api.get_pod(self.pod_id)
        except TransientError:
            return False
        return pod is None or pod.desired_status not in ("RUNNING", "CREATED", "RESTARTING")

    async def _wait_server(self, url: str) -> None:
        """Wait (up to ``server_wait_seconds``) until the pod's server answers ``GET <url><base_url>api`` with 200;
        a pod that is gone or stopped meanwhile fails the start."""
        api_url = url.rstrip("/") + (self.server.base_url if self.server is not None else "/") + "api"
        client = AsyncHTTPClient()
        deadline = time.monotonic() + self.server_wait_seconds
        next_pod_check = time.monotonic() + 5
        interval = 0.1
        while time.monotonic() < deadline:
            try:
                reply = await client.fetch(api_url, raise_error=False, request_timeout=5, follow_redirects=False)
                if reply.code == 200:
                    return
            except (OSError, HTTPClientError):
                pass
            if time.monotonic() >= next_pod_check:
                next_pod_check = time.monotonic() + 5
                if await self._pod_gone():
                    raise SpawnException(
                        "Your RunPod pod stopped while its server was starting. Please try again.",
                        reason="runpod_exited",
                        status_code=503,
                    )
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 0.5)
        self.log.info(
            "Server in pod %s is not answering after %g s; the hub keeps waiting", self.pod_id, self.server_wait_seconds
        )

    async def _cleanup_failed_start(self) -> None:
        """Terminate what this start created (by id, or by name when it was cancelled before the reply); a resumed
        pod is stopped again instead, keeping its disk."""
        try:
            if self._resumed:
                await self.suspend()
                return
            if not self.pod_id:
                found = await self.api.find_pod(self.pod_name)
                self.pod_id = found.id if found and found.desired_status != "EXITED" else ""
            if self.pod_id:
                await self.api.terminate_pod(self.pod_id)
                self.log.info("Pod %s of %s terminated after a failed start", self.pod_id, self._log_name)
        except Exception:
            self.log.exception(
                "Could not terminate pod %s (%s) after a failed start; the RunPod reaper will find it",
                self.pod_id or "?",
                self.pod_name,
            )
        finally:
            self.pod_id = ""
            self.price_per_hour_usd = 0.0

    def _api_failure(self, error: RunPodError, doing: str) -> SpawnException:
        """A sentence for the user; the details (never the key) go to the log for the admin."""
        return api_failure(error, doing, self.log, self._log_name)

    # ----- poll / stop ---------------------------------------------------------------------------------

    async def _adopt_by_name(self) -> None:
        """A server without a pod id in its state: find its pod by the deterministic name."""
        if self.pod_id:
            return
        found = await self.api.find_pod(self.pod_name)
        if found is not None:
            self.log.info("Adopting pod %s of %s by its name %s", found.id, self._log_name, found.name)
            self.pod_id = found.id
            self.price_per_hour_usd = found.cost_per_hr

    async def poll(self) -> int | None:
        """None while the pod runs (or RunPod cannot say right now); 0 once it is EXITED or gone."""
        try:
            await self._adopt_by_name()
            if not self.pod_id:
                return 0
            pod = await self.api.get_pod(self.pod_id)
        except (TransientError, BadApiKey) as e:
            # Never forget a running (billing) pod because the API hiccuped: ask again at the next poll.
            self.log.warning("Could not poll pod %s of %s: %s", self.pod_id or "?", self._log_name, e)
            return None
        except RunPodError as e:
            self.log.warning("Could not poll pod %s of %s: %s", self.pod_id, self._log_name, e)
            return None
        if pod is None:
            self.log.info("Pod %s of %s is gone", self.pod_id, self._log_name)
            return 0
        if pod.desired_status == "EXITED" or pod.desired_status in ("TERMINATED", "DEAD"):
            self.log.info("Pod %s of %s is %s", pod.id, self._log_name, pod.desired_status)
            return 0
        if pod.cost_per_hr:
            self.price_per_hour_usd = pod.cost_per_hr
        return None

    async def stop(self, now: bool = False) -> None:
        """Terminate the pod (or stop it, keeping its volume, with ``stop_action = "stop"``); idempotent."""
        await self._adopt_by_name()
        if not self.pod_id:
            return
        if self.stop_action == "stop":
            await self.suspend()
            return
        try:
            await self.api.terminate_pod(self.pod_id)
        except RunPodError as e:
            self.log.error("Could not terminate pod %s of %s: %s", self.pod_id, self._log_name, e)
            raise
        self.log.info("Pod %s of %s terminated", self.pod_id, self._log_name)

    async def suspend(self, now: bool = False) -> None:
        """Stop the pod keeping its disk (billed for storage only), e.g. when the workspace sync before a stop
        failed and terminating would lose work. Idempotent."""
        await self._adopt_by_name()
        if not self.pod_id:
            return
        pod = await self.api.get_pod(self.pod_id)
        if pod is None or pod.desired_status == "EXITED":
            return
        await self.api.stop_pod(self.pod_id)
        self.log.info("Pod %s of %s stopped (disk kept)", self.pod_id, self._log_name)

    # ----- the form ------------------------------------------------------------------------------------

    async def offered_prices(self, gpu_types: list[str], gpu_count: int, cloud_type: str) -> list[dict[str, Any]]:
        """Live prices for the form: per GPU type, its name and price per pod-hour in the profile's cloud(s)."""
        if not self.api_key:
            return [{"id": g, "name": g, "price": None} for g in gpu_types]
        return price_rows(await self.api.gpu_types(list(gpu_types)), gpu_types, gpu_count, cloud_type)

    # ----- state ---------------------------------------------------------------------------------------

    def monitor_state(self) -> dict[str, Any]:
        """What the pod rents, for the monitor: ``price_per_hour_usd`` (the whole pod), ``gpu_type``, ``gpu_count``."""
        if not self.pod_id:
            return {}
        return {
            "price_per_hour_usd": self.price_per_hour_usd,
            "gpu_type": self.gpu_type_id,
            "gpu_count": self.gpu_count,
        }

    def get_state(self) -> dict[str, Any]:
        """The pod id (the hub re-adopts the pod with it), its name, GPU, cloud and price per hour."""
        state = super().get_state()
        if self.pod_id:
            state.update(
                pod_id=self.pod_id,
                pod_name=self.pod_name,
                gpu_type_id=self.gpu_type_id,
                gpu_count=self.gpu_count,
                cloud_type=self.cloud_type,
                price_per_hour_usd=self.price_per_hour_usd,
            )
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Rebuild from a saved state (hub restart)."""
        super().load_state(state)
        self.pod_id = state.get("pod_id", "")
        self.gpu_type_id = state.get("gpu_type_id", "")
        self.gpu_count = int(state.get("gpu_count", 0))
        self.cloud_type = state.get("cloud_type", "")
        self.price_per_hour_usd = float(state.get("price_per_hour_usd", 0.0))

    def clear_state(self) -> None:
        """Forget the pod (after a stop)."""
        super().clear_state()
        self.pod_id = self.gpu_type_id = self.cloud_type = ""
        self.gpu_count = 0
        self.price_per_hour_usd = 0.0
