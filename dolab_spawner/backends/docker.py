"""The docker backend: one container per server on a Docker Engine, holding exactly its GPU slot.

Built on DockerSpawner, so every ``c.DockerSpawner.*`` setting an admin already has keeps working
(``image``, ``volumes``, ``mem_limit``, ``network_name``, ``extra_host_config``...). What DO-LAB changes:

- the image comes only from the profile (its ``spawner_override`` or a ``profile_options`` choice): a user can
  never name an image that is not offered;
- GPUs are attached per slot (``device_requests`` with the NVIDIA toolkit, or the device nodes);
- the container runs as a non-root user (a uid, ``root`` or a name that the image's /etc/passwd maps to uid 0 is
  refused), with no capabilities, no new privileges (an admin's ``security_opt`` is added to it), no Docker socket
  and nothing of the hub's environment but the server's own token;
- every container carries the hub's identity (:mod:`dolab_core.hubidentity`) in its name
  (``dolab-<hub id>-<user>[--<server>]``) and its ``dolab.hub`` label, so the reaper removes only its own hub's;
- a ``tls`` engine is always verified against its ``ca_cert``;
- the workspace (a host directory, or a named volume on remote engines) is mounted at ``workspace_mount_path``;
- Docker calls run on two bounded thread pools per engine, shared by the hub's servers and sized by the first
  server that uses them (:mod:`dolab_core.engines.docker`): pulls on ``pull_pool_size`` threads, everything else on
  ``docker_pool_size``. So pulls wait only for other pulls of the same engine, never hold up the other servers'
  starts, polls and stops; each SDK call has its own timeout too (a pull's is between two chunks);
- the slot pool may span several engines (``DoLabSpawner.docker_hosts``): a slot is (host, GPU).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import docker
import docker.errors
import requests
from dockerspawner import DockerSpawner
from jupyterhub.spawner import SpawnException
from traitlets import Dict, Enum, Float, Integer, List, Unicode, default

from dolab_core.engines.docker import DOLAB_LABEL, HUB_LABEL, engines
from dolab_core.gpus import LOCAL_HOST
from dolab_core.hubidentity import hub_id
from dolab_lab.notice import CONTAINER_DIR, NOTICE_NAME, LabNoticeTraits, built_notice

from .base import Backend, http_answers
from .docker_hosts import host_entry, workspace_kind
from .docker_user import image_passwd, run_as_uid

if TYPE_CHECKING:
    from ..spawner import DoLabSpawner

__all__ = ["DockerBackend"]


def _is_gpu_driver_error(error: Exception) -> bool:
    return "could not select device driver" in str(error)


class DockerBackend(LabNoticeTraits, Backend, DockerSpawner):
    """A single-user server in a container (``backend: docker``)."""

    gpu_attach = Enum(
        ["device_requests", "devices"],
        "device_requests",
        config=True,
        help="""How a slot's GPU reaches the container.

        ``device_requests`` (default): Docker's device requests with the slot's GPU UUID and the ``gpu``
        capability; needs the NVIDIA Container Toolkit on the engine's host. ``devices``: map the GPU's device
        node (``/dev/nvidia<index>``, or the inventory entry's ``device``) and ``gpu_control_devices``, and set
        ``NVIDIA_VISIBLE_DEVICES``; for hosts without the toolkit (the image must carry the CUDA user libraries).
        """,
    )

    gpu_control_devices = List(
        Unicode(),
        ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"],
        config=True,
        help="Device nodes every GPU container also needs in ``devices`` mode (those missing on the host are skipped).",
    )

    container_user = Unicode(
        "",
        config=True,
        help="""User (``uid[:gid]`` or ``name[:group]``) the container runs as. Empty: the image's own user. Either
        must not be root: DO-LAB refuses uid 0 in any spelling (``0``, ``0000``, ``root``, ``0:0``) and any name
        that the image's /etc/passwd maps to uid 0.""",
    )

    workspace_mount_path = Unicode(
        "/home/jovyan/work",
        config=True,
        help="Where the user's workspace is mounted in the container (the server starts there).",
    )

    workspace_uid = Integer(
        1000,
        config=True,
        help="Owner (uid) given to a new workspace directory on the host, so the container user can write it.",
    )

    docker_pool_size = Integer(8, config=True, help="Threads per engine for Docker calls other than pulls.")
    pull_pool_size = Integer(2, config=True, help="Threads per engine for image pulls.")
    docker_timeout_seconds = Float(60, config=True, help="SDK timeout of one Docker call (seconds).")
    pull_timeout_seconds = Float(900, config=True, help="SDK timeout between two chunks of a pull (seconds).")
    ready_timeout_seconds = Float(60, config=True, help="How long to wait for the container's server to answer.")
    pull_progress_interval_seconds = Float(2, config=True, help="At most one pull progress event this often.")

    docker_host = Dict(help="The ``docker_hosts`` entry this server runs on (set by DoLabSpawner).")
    hub_id = Unicode(help="This hub's id (:mod:`dolab_core.hubidentity`), in every container's name and labels.")

    @default("hub_id")
    def _default_hub_id(self) -> str:
        return hub_id()

    @default("prefix")
    def _default_prefix(self) -> str:
        # Names carry the hub's id: another hub on the same engine never takes (or removes) this one's container.
        return f"dolab-{self.hub_id}"

    @default("remove")
    def _default_remove(self) -> bool:
        # The workspace outlives the container; a stopped container would only keep a stale token.
        return True

    @default("notebook_dir")
    def _default_notebook_dir(self) -> str:
        return self.workspace_mount_path

    @property
    def host_name(self) -> str:
        """The engine's name in ``docker_hosts``."""
        return str(self.docker_host.get("name", "local"))

    # ----- the backend interface -----------------------------------------------------------------------

    @classmethod
    def hosts(cls, spawner: DoLabSpawner) -> list[str]:
        """The engines of ``DoLabSpawner.docker_hosts``, in their order."""
        return [h["name"] for h in spawner.docker_hosts]

    @classmethod
    def placement(cls, spawner: DoLabSpawner, host: str) -> dict[str, Any]:
        """The ``docker_hosts`` entry of the engine ``host``."""
        return {"docker_host": host_entry(spawner.docker_hosts, host)}

    def host_workspace(self) -> str:
        """The workspace folder when it is bind-mounted from this machine (the local engine's default)."""
        if self.host_name == LOCAL_HOST and workspace_kind(self.docker_host) == "bind":
            return self.workspace_dir
        return ""

    def new_workspace_uid(self) -> int | None:
        """``workspace_uid``: the container's user must be able to write a workspace made for it."""
        return self.workspace_uid

    # ----- the engine ----------------------------------------------------------------------------------

    @property
    def client(self) -> docker.APIClient:
        """This server's engine (DockerSpawner has one class-wide client)."""
        return engines.client(self.docker_host, self.docker_timeout_seconds)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """This engine's pool (DockerSpawner has one class-wide thread for every user)."""
        return engines.pool(self.docker_host, self.docker_pool_size)

    def docker(self, method: str, *args: Any, **kwargs: Any) -> asyncio.Future:
        """Run one docker-py call off the event loop; pulls go to their own pool."""
        return asyncio.wrap_future(self.executor.submit(self._docker, method, *args, **kwargs))

    async def pull_image(self, image: str) -> None:
        """Pull if needed (``pull_policy``), streaming progress to the spawn page."""
        if self.pull_policy == "skip":
            return
        if self.pull_policy.lower() != "always":
            try:
                await self.docker("inspect_image", image)
                return
            except docker.errors.NotFound:
                if self.pull_policy == "never":
                    raise
        self._emit(35, f"Pulling image {image}")
        loop = asyncio.get_running_loop()
        last = [0.0]

        def report(line: dict[str, Any]) -> None:
            now = time.monotonic()
            if line.get("error"):
                raise docker.errors.APIError(line["error"])
            if now - last[0] >= self.pull_progress_interval_seconds and line.get("status"):
                last[0] = now
                detail = f" {line['progress']}" if line.get("progress") else ""
                loop.call_soon_threadsafe(self._emit, 40, f"Pulling {image}: {line['status']}{detail}")

        def pull() -> None:
            client = engines.client(self.docker_host, self.pull_timeout_seconds, purpose="pull")
            # docker-py splits the name itself (registry:port/repo:tag, repo@sha256:digest).
            for line in client.pull(image, stream=True, decode=True):
                report(line)

        pool = engines.pool(self.docker_host, self.pull_pool_size, purpose="pull")
        try:
            await asyncio.wrap_future(pool.submit(pull))
        except (docker.errors.DockerException, requests.RequestException) as e:
            self.log.error("Pulling %s on engine %s failed: %s", image, self.host_name, e)
            raise self._refuse(
                f"The image {image} is not on this server and could not be pulled. Ask an administrator to pull"
                " it (dolab pull)."
            ) from None

    def _emit(self, progress: int, message: str) -> None:
        if self.progress_callback is not None:
            self.progress_callback(progress, message)

    # ----- what the container gets ---------------------------------------------------------------------

    def _gpu_host_config(self) -> dict[str, Any]:
        slots = self.slots
        if not slots:
            return {}
        if self.gpu_attach == "device_requests":
            # Plain kwargs, not a DeviceRequest: DockerSpawner re-renders the config as plain dicts.
            return {"device_requests": [{"device_ids": [s.uuid for s in slots], "capabilities": [["gpu"]]}]}
        devices = [f"{s.device or f'/dev/nvidia{s.index}'}:/dev/nvidia{s.index}:rwm" for s in slots]
        local = self.host_name == "local"
        devices += [f"{d}:{d}:rwm" for d in self.gpu_control_devices if not local or os.path.exists(d)]
        return {"devices": devices}

    async def _extra_host_config(self) -> dict[str, Any]:
        config = await self._admin_value(self._admin_host_config)
        admin_options = config.get("security_opt") or []
        if isinstance(admin_options, str):
            admin_options = [admin_options]
        # The admin's options are kept (seccomp or AppArmor profiles...); any no-new-privileges of theirs gives way
        # to ours, which is always on.
        security_opt = [
            str(o) for o in admin_options if re.split(r"[=:]", str(o))[0].strip().lower() != "no-new-privileges"
        ]
        ours = {
            # Removed by stop(), not by the engine: a container that dies at start keeps its logs for the admin.
            "auto_remove": False,
            "security_opt": [*security_opt, "no-new-privileges"],
            "cap_drop": ["ALL"],
            **self._gpu_host_config(),
        }
        return {**config, **ours}

    async def _extra_create_kwargs(self) -> dict[str, Any]:
        kwargs = await self._admin_value(self._admin_create_kwargs)
        labels = {
            **kwargs.get("labels", {}),
            **self._labels(),
            "dolab.gpus": ",".join(s.uuid for s in self.slots),
        }
        kwargs["labels"] = labels
        # The server, its terminals and kernels started without a path all begin in the workspace.
        kwargs.setdefault("working_dir", self.workspace_mount_path)
        if self.container_user:
            kwargs["user"] = self.container_user
        # Here, inside create_object: after the pull, right before the create, with the user the create gets.
        await self._check_user(str(kwargs.get("user") or ""))
        return kwargs

    def _labels(self) -> dict[str, str]:
        """What every container of this server carries: DO-LAB's mark, the hub's id, the server and engine."""
        return {
            DOLAB_LABEL: "true",
            HUB_LABEL: self.hub_id,
            "dolab.user": self.user.name,
            "dolab.server": self.name,
            "dolab.host": self.host_name,
        }

    async def _admin_value(self, value: Any) -> dict[str, Any]:
        value = value(self) if callable(value) else value
        if asyncio.iscoroutine(value):
            value = await value
        return dict(value or {})

    def _workspace_volume(self) -> dict[str, Any]:
        if workspace_kind(self.docker_host) == "volume":
            name = f"dolab-ws-{os.path.basename(self.workspace_dir.rstrip('/'))}"
            return {name: {"bind": self.workspace_mount_path, "mode": "rw"}}
        return {self.workspace_dir: {"bind": self.workspace_mount_path, "mode": "rw"}}

    def _notice_volume(self) -> dict[str, Any]:
        """The culler's JupyterLab notice, read-only where every Jupyter looks (dolab_lab.notice);
        only on this machine's engine, the one that can see this machine's files."""
        if not self.lab_notice or self.host_name != LOCAL_HOST or not (share := built_notice(log=self.log)):
            return {}
        return {str(share / "labextensions" / NOTICE_NAME): {"bind": CONTAINER_DIR, "mode": "ro"}}

    def _prepare_workspace(self) -> None:
        if self._workspace_volume().get(self.workspace_dir) is None:
            return  # a named volume: the engine creates it
        if not os.path.isdir(self.workspace_dir):
            os.makedirs(self.workspace_dir, mode=0o700)
            if os.geteuid() == 0:
                os.chown(self.workspace_dir, self.workspace_uid, -1)

    def _refuse_user(self, spec: str, problem: str = "") -> SpawnException:
        if problem:
            return self._refuse(
                f"This profile's container user cannot be checked ({problem}), so DO-LAB will not start it. Ask an"
                " administrator to give the profile a non-root user of its image."
            )
        return self._refuse(
            f"This profile would run its container as root (user {spec!r}), so DO-LAB will not start it. Ask an"
            " administrator to give the profile a non-root user."
        )

    def _check_container_user(self) -> None:
        """Before any pull: refuse a ``container_user`` that is root by its numeric form or the name ``root``."""
        if not self.container_user:
            return
        try:
            uid = run_as_uid(self.container_user, None)
        except ValueError as e:
            raise self._refuse_user(self.container_user, str(e)) from None
        if uid == 0:
            raise self._refuse_user(self.container_user)

    async def _check_user(self, spec: str) -> None:
        """Refuse a container that would run as root: ``spec`` is the user the create call gets (empty: the
        image's own), names resolved in the image's /etc/passwd as runc does."""
        info = await self.docker("inspect_image", self.image)
        if not spec:
            spec = (info.get("Config") or {}).get("User") or ""
            if not spec:
                raise self._refuse(
                    f"The image {self.image} runs as root and the profile names no other user, so DO-LAB will not"
                    " start it. Ask an administrator to give the profile a non-root user or a non-root image."
                )
        try:
            uid = run_as_uid(spec, None)
            if uid is None:
                uid = run_as_uid(spec, await self._image_passwd(str(info.get("Id") or self.image)))
        except ValueError as e:
            raise self._refuse_user(spec, str(e)) from None
        if uid == 0:
            raise self._refuse_user(spec)

    async def _image_passwd(self, image_id: str) -> str:
        """The image's /etc/passwd (read once per engine and image id, from a container that is never started)."""
        labels = {**self._labels(), "dolab.probe": "passwd"}  # a leftover is the reaper's, like any other
        return await image_passwd(self.executor, self.client, self.host_name, image_id, labels)

    def _refuse(self, message: str, status_code: int = 503) -> SpawnException:
        self.log.warning("Not starting %s on engine %s: %s", self._log_name, self.host_name, message)
        return SpawnException(message, reason="docker", status_code=status_code)

    # ----- start / stop --------------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Create and start the container; every engine failure becomes a sentence and leaves nothing behind.

        The image comes from the profile only: a backend never gets the user's ``user_options``, from which
        DockerSpawner would take an ``image``.
        """
        self._admin_host_config = self.extra_host_config
        self._admin_create_kwargs = self.extra_create_kwargs
        self.extra_host_config = lambda spawner: spawner._extra_host_config()
        self.extra_create_kwargs = lambda spawner: spawner._extra_create_kwargs()
        self.volumes = {**self.volumes, **self._workspace_volume(), **self._notice_volume()}
        try:
            await self._set_hub_connect_url()
            self._prepare_workspace()
            self._check_container_user()
            ip, port = await super().start()
            await self._wait_listening(ip, port)
            return ip, port
        except SpawnException:
            await self._remove_quietly()
            raise
        except docker.errors.ImageNotFound:
            await self._remove_quietly()
            raise self._refuse(
                f"The image {self.image} is not on this server and could not be pulled. Ask an administrator to"
                " pull it (dolab pull)."
            ) from None
        except docker.errors.APIError as e:
            await self._remove_quietly()
            self.log.error("Docker engine %s refused to start %s: %s", self.host_name, self._log_name, e)
            if _is_gpu_driver_error(e):
                raise self._refuse(
                    "The Docker engine cannot attach GPUs (no NVIDIA Container Toolkit). Pick a CPU profile, or ask"
                    " an administrator to install the toolkit or set c.DockerBackend.gpu_attach = 'devices'."
                ) from None
            if e.status_code == 404 or "pull access denied" in str(e) or "not found" in str(e).lower():
                raise self._refuse(
                    f"The image {self.image} is not on this server and could not be pulled. Ask an administrator"
                    " to pull it (dolab pull)."
                ) from None
            raise self._refuse(
                "The Docker engine refused to start your server. Try again or tell an administrator."
            ) from None
        except RuntimeError as e:
            # DockerSpawner's "Failed to get port info": the container stopped before its port was published.
            self.log.warning("Start of %s failed: %s", self._log_name, e)
            try:
                if self.object_id:
                    await self._check_running()
            finally:
                await self._remove_quietly()
            raise self._refuse("Your server could not be started. Try again or tell an administrator.") from None
        except (docker.errors.DockerException, requests.RequestException, OSError) as e:
            self.log.error("Docker engine %s is not answering: %s", self.host_name, e)
            raise self._refuse(
                f"The Docker engine {self.host_name!r} is not answering. Try again later or tell an administrator."
            ) from None

    async def _set_hub_connect_url(self) -> None:
        """How the container reaches the hub: the host's ``hub_connect_url``, else the network's gateway."""
        configured = self.docker_host.get("hub_connect_url") or self.hub_connect_url
        if configured:
            self.hub_connect_url = configured
            return
        hub_ip = self.hub.ip or ""  # where the hub's API listens (its bind address, not its host name)
        port = urlparse(self.hub.api_url).port
        if hub_ip.startswith("127.") or hub_ip in ("localhost", "::1"):
            raise self._refuse(
                "The hub listens on the loopback address only, so a container cannot reach it. Ask an administrator"
                " to set DOLAB_HUB_IP=0.0.0.0 (or hub_connect_url for this Docker host)."
            )
        if hub_ip not in ("0.0.0.0", "", "::"):
            self.hub_connect_url = f"http://{hub_ip}:{port}"
            return
        # Listening everywhere: the container reaches this machine at its network's gateway.
        network = await self.docker("inspect_network", self.network_name)
        configs = network.get("IPAM", {}).get("Config") or []
        gateway = next((c.get("Gateway") for c in configs if c.get("Gateway")), "")
        if not gateway:
            # Some engines list the default bridge's subnet without its gateway: Docker's IPAM gives the gateway the
            # subnet's first address.
            subnets = [c["Subnet"] for c in configs if ":" not in str(c.get("Subnet") or ":")]
            gateway = str(next(ipaddress.ip_network(subnets[0], strict=False).hosts())) if subnets else ""
        if gateway:
            self.hub_connect_url = f"http://{gateway}:{port}"

    async def _check_running(self) -> None:
        """Raise the user's sentence (and log the container's last lines) if the container has stopped."""
        info = await self.docker("inspect_container", self.object_id)
        state = info.get("State", {})
        if state.get("Running"):
            return
        code = state.get("ExitCode")
        logs = await self.docker("logs", self.object_id, tail=20)
        self.log.warning(
            "Container %s of %s exited during start-up (code %s):\n%s",
            self.object_name,
            self._log_name,
            code,
            logs.decode(errors="replace") if isinstance(logs, bytes) else logs,
        )
        raise self._refuse(
            f"Your server exited during start-up (exit code {code}). Try again; if it keeps failing, an"
            " administrator can read its log in the hub's log."
        )

    async def _wait_listening(self, ip: str, port: int) -> None:
        deadline = time.monotonic() + self.ready_timeout_seconds
        while time.monotonic() < deadline:
            await self._check_running()
            if await http_answers(ip, port, f"{self.server.base_url}api"):
                return
            await asyncio.sleep(0.3)

    async def _remove_quietly(self) -> None:
        """Remove what a failed start left, whatever state it is in."""
        if not self.object_id:
            return
        try:
            await self.docker("remove_container", self.object_id, force=True)
        except Exception as e:  # best effort: log and go on
            self.log.debug("Could not remove %s after a failed start: %s", self.object_name, e)
        self.object_id = ""

    async def stop(self, now: bool = False) -> None:
        """Stop and remove the container. An engine that does not answer is logged, not raised: the hub then
        forgets the server, and the reaper finds the container once the engine is back."""
        try:
            await super().stop(now=now)
        except (docker.errors.DockerException, requests.RequestException, OSError) as e:
            if isinstance(e, docker.errors.APIError) and e.status_code not in (None, 500, 502, 503):
                raise
            self.log.error(
                "Docker engine %s did not answer while stopping %s (%s); the reaper will find %s if it is left",
                self.host_name,
                self._log_name,
                e,
                self.object_name,
            )
            self.clear_state()

    async def suspend(self, now: bool = False) -> None:
        """Stop the container without removing it: what DoLabSpawner does instead of ``stop()`` when a pre-destroy
        hook (the final backup) failed, so nothing in the container is lost. The next start replaces it."""
        if not self.object_id:
            return
        self.log.warning("Keeping container %s of %s: stopped, not removed", self.object_name, self._log_name)
        try:
            await self.stop_object()
        except (docker.errors.DockerException, requests.RequestException, OSError) as e:
            self.log.error("Docker engine %s did not stop %s: %s", self.host_name, self.object_name, e)

    def get_state(self) -> dict[str, Any]:
        """DockerSpawner's state plus the engine it runs on."""
        state = super().get_state()
        if state:
            state["docker_host"] = self.host_name
        return state
