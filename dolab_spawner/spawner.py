"""DoLabSpawner: the one spawner the hub sees.

It reads the chosen profile, validates the untrusted ``user_options``, checks plan and quota, reserves GPU slots,
hands the server to the profile's backend (a local process, a Docker container or a RunPod pod: :mod:`.backends`,
through the :class:`~.backends.base.Backend` interface, never by name), streams progress, and keeps in the spawner
state (:class:`~dolab_core.serverstate.ServerState`) everything needed to find the server again after a hub
restart. The options form is :mod:`.form`.
"""

from __future__ import annotations

import os
import string
from datetime import datetime, timezone
from typing import Any

from escapism import escape
from jupyterhub.spawner import Spawner, SpawnException
from jupyterhub.utils import maybe_future
from traitlets import Any as AnyTrait
from traitlets import Callable, Dict, Float, List, TraitError, Unicode, Union, default, observe, validate

from dolab_core.gpus import LOCAL_HOST, GpuSlot
from dolab_core.hooks import load_hook
from dolab_core.paths import default_data_dir
from dolab_core.serverstate import ServerState
from dolab_core.times import format_time
from dolab_lab.notice import LabNoticeTraits

from . import form
from .backends import BACKENDS, backend_class
from .backends.base import Backend, ServerReadyHook, apply_overrides, make_backend
from .options import OptionsError, Selection, parse_stop_at, resolve_options
from .progress import ProgressEvents
from .reservations import GpuReservations
from .user_profiles import UserProfiles

__all__ = ["DoLabSpawner"]

_SAFE_CHARS = set(string.ascii_lowercase + string.digits)


def workspace_name(username: str) -> str:
    """A directory (or volume) name for a user: only ``[a-z0-9-]``, so no name can climb out of the root."""
    return escape(username, safe=_SAFE_CHARS, escape_char="-")


class DoLabSpawner(LabNoticeTraits, ProgressEvents, UserProfiles, GpuReservations, Spawner):
    """Profiles, GPU slots and backends behind one spawner.

    Extension points, in the order ``start()`` uses them: :meth:`get_profiles` (:mod:`.user_profiles`),
    :meth:`check_quota`, slot allocation (:mod:`.reservations`), :meth:`make_backend`, the backend's ``start()``.
    Services reach the running server through public members only (:meth:`host_workspace`,
    :attr:`server_ready_hooks`, :attr:`workspace_uid`, the state).
    """

    profile_list = Union(
        [List(), Callable()],
        default_value=[],
        config=True,
        help="""Profiles users choose from, in kubespawner's schema plus DO-LAB's keys.

        Each entry: ``display_name`` (required), ``slug`` (default: from the display name), ``description``,
        ``default`` (bool), ``backend`` (``local``, ``docker`` or ``runpod``), ``gpus`` (count, default 0),
        ``gpu_type`` (matched on whole words of the GPU name, e.g. ``"A100"``), ``spawner_override`` (trait ->
        value, set on the spawner and the backend; dicts merge) and ``profile_options`` (name -> ``{display_name,
        choices: {slug: {display_name, description, default, spawner_override}}}``). ``backend: runpod`` profiles add
        ``runpod`` (``gpu_types``, ``cloud_type``, ``image``, disks, ``max_price_per_hour``; see the README).

        A callable ``f(spawner)`` (may be async) returning such a list is evaluated at each form render and
        start. Empty (default): "CPU only" plus one one-GPU profile per GPU model found.
        """,
    )

    gpu_inventory = Union(
        [List(Dict()), AnyTrait()],
        default_value=None,
        allow_none=True,
        config=True,
        help="""This machine's GPUs, replacing NVML's view: a list of dicts with ``index``, ``uuid``,
        ``name``, ``memory_gb`` and optionally ``device`` (its device node, for ``gpu_attach = "devices"``).
        None (default): read the GPUs through NVML once, at the first need. For hosts without NVML and tests;
        other machines' GPUs are listed in ``docker_hosts``.
        """,
    )

    gpu_ids: List[int | str] = List(
        config=True,
        help="Restrict the GPUs handed out to these indices or UUIDs, e.g. [0, 1]. Empty: all of them.",
    )

    max_run_hours = Float(
        168,
        config=True,
        help="""The latest stop time a user may choose, in hours from the start (``run_hours`` or
        ``stop_at``). 0: no maximum.
        """,
    )

    workspace_root = Unicode(
        config=True,
        help="""Directory holding one workspace per user (``<root>/<escaped username>``); the server starts
        in it. Default: ``<data dir>/workspaces``.
        """,
    )

    docker_hosts = List(
        Dict(),
        config=True,
        help="""The Docker engines ``backend: docker`` profiles run on, one slot pool across them.

        Each entry: ``name`` (``local`` is this machine, whose GPUs come from NVML or ``gpu_inventory``),
        ``url`` (``unix:///var/run/docker.sock``, ``tcp://host:2376``, ``ssh://user@host[:port]``; empty: the
        environment's DOCKER_HOST or the local socket), ``tls`` (``docker.tls.TLSConfig`` arguments), ``ssh``
        (for an ``ssh://`` url: ``{"identity_file": path, "known_hosts": path}``, absolute paths; only that key is
        offered, the host's key must be in that known_hosts file and an unknown host is refused; the hub user's
        ~/.ssh is not read. Without it, docker-py uses the hub user's ~/.ssh/config, keys, agent and known_hosts,
        or with ``use_ssh_client: True`` the ssh command; the remote user needs ``docker system dial-stdio``),
        ``gpu_inventory`` (that machine's GPUs, as in ``DoLabSpawner.gpu_inventory``), ``hub_connect_url`` (how
        its containers reach the hub) and ``workspace`` (``bind``: a host directory under ``workspace_root``,
        the default for ``local``; ``volume``: a named volume, the default elsewhere). Default: ``[{"name":
        "local"}]``.
        """,
    )

    nvml_timeout_seconds = Float(20, config=True, help="How long to wait for NVML when reading the GPUs.")

    plans = Dict(
        config=True,
        help="""Plans: which profiles, quotas, run time and culling exemption each group's members get (see
        ``dolab_core.plans``): ``{"plans": {name: {"profiles": [slugs] or "*", "quotas": {"gpu_hours": {"week":
        40}, "usd": {"month": 200}}, "max_run_hours": 72, "cull_exempt": false}}, "groups": {group: plan or [plans]},
        "default_plan": name}``. A user gets the combination of their JupyterHub groups' plans: the form shows only
        the profiles it allows and any other is refused (403), REST included. Empty (default): no restriction.
        """,
    )

    quota_check = AnyTrait(
        None,
        allow_none=True,
        config=True,
        help="""Optional ``f(spawner, selection)`` (may be async) called before any slot or pod is taken;
        raise ``SpawnException`` to refuse. The monitor service's quotas plug in here.
        """,
    )

    pre_start_hooks = List(
        Union([Callable(), Unicode()]),
        config=True,
        help="""Called in order by ``start()`` after the options are checked and the slots taken, just before the
        backend starts the server: ``hook(spawner)`` (may be async) or ``"module:callable"`` strings. Progress
        goes to the spawn page through ``spawner.emit(percent, message)``; an exception fails the start. The sync
        service's restore of a new workspace plugs in here (``dolab_services.sync.hooks:restore_new_workspace``).
        """,
    )

    pre_destroy_hooks = List(
        Union([Callable(), Unicode()]),
        config=True,
        help="""Called in order by ``stop()`` before the backend destroys the server: ``hook(spawner, reason)``
        (may be async; ``reason`` is ``"stop"``) or ``"module:callable"`` strings. The sync service's final backup
        plugs in here (``dolab_services.sync.hooks:final_sync``). When one raises, the server is stopped but its
        storage kept (the backend's ``suspend()``: docker stops the container without removing it, RunPod stops
        the pod with its disk, a local workspace outlives its server anyway), the reason is logged as an error and
        kept in the server's state (``kept``) until its next start.
        """,
    )

    # What the state records (and so what survives a hub restart).
    profile_slug = Unicode("")
    backend_name = Unicode("")
    host_name = Unicode("")
    slot_dicts: List[dict] = List()
    stop_at = Unicode("")
    #: Why the last stop kept the server's storage (a pre-destroy hook failed), and when; "" when it did not.
    kept_reason = Unicode("")
    kept_at = Unicode("")

    _backend: Backend | None = None

    # ----- configuration -------------------------------------------------------------------------------

    @default("workspace_root")
    def _default_workspace_root(self) -> str:
        return os.path.join(default_data_dir(), "workspaces")

    @default("apply_user_options")
    def _default_apply_user_options(self) -> Any:
        # DO-LAB reads user_options itself, in start(); this hook only sets what the hub reads before start() runs.
        return self._apply_hub_traits

    async def _apply_hub_traits(self, spawner: Spawner, user_options: Any) -> None:
        """Before ``start()``: the chosen profile's ``start_timeout``/``http_timeout`` (a RunPod pod needs minutes).

        The hub reads ``start_timeout`` before ``start()`` runs, so start() alone would set it one start too late.
        Bad options change nothing here: ``start()`` refuses them with a sentence.
        """
        try:
            selection = resolve_options(await self.get_profiles(), user_options)
        except Exception:
            return
        timeouts = backend_class(selection.profile.backend).hub_timeouts(self, selection)
        self._apply_own_overrides({**timeouts, **selection.spawner_override})

    @default("docker_hosts")
    def _default_docker_hosts(self) -> list[dict[str, Any]]:
        return [{"name": LOCAL_HOST}]

    @validate("docker_hosts")
    def _validate_docker_hosts(self, proposal: dict) -> Any:
        # Here, not at the top: the check imports docker-py, which a hub without Docker engines never needs.
        from dolab_core.engines.docker import check_docker_hosts

        try:
            return check_docker_hosts(proposal["value"])
        except ValueError as e:
            raise TraitError(f"DoLabSpawner.docker_hosts: {e}") from None

    @validate("pre_start_hooks", "pre_destroy_hooks")
    def _validate_hooks(self, proposal: dict) -> Any:
        # A typo would otherwise show only at a stop, as a failed backup that keeps every server's storage.
        for hook in proposal["value"]:
            try:
                load_hook(hook)
            except ValueError as e:
                raise TraitError(f"DoLabSpawner.{proposal['trait'].name}: {e}") from None
        return proposal["value"]

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise a readable error for bad DoLabSpawner config, so the hub refuses to start on it.

        The spawner is built lazily per user, so without this a typo in ``profile_list`` would show up only
        at a user's first start. The shipped ``jupyterhub_config.py`` calls it.
        """
        cls(config=config)

    # ----- the options form ----------------------------------------------------------------------------

    @default("options_form")
    def _default_options_form(self) -> Any:
        return self.render_options_form

    async def render_options_form(self, spawner: Spawner | None = None) -> str:
        """The form: one card per profile with live GPU availability and prices, its options, and a stop time."""
        return await form.render_options_form(self)

    async def options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, Any]:
        """Turn the posted form into user_options, and check them so errors show on the form itself."""
        return await form.options_from_form(self, formdata)

    # ----- start / poll / stop -------------------------------------------------------------------------

    _previous_user_options: dict[str, Any] | None = None
    _saved_traits: dict[str, Any]

    @observe("user_options")
    def _remember_user_options(self, change: dict) -> None:
        # The hub stores new user_options before start() can check them: keep the last ones to put back.
        self._previous_user_options = change["old"]

    def _refuse(self, message: str, reason: str, status_code: int) -> SpawnException:
        self.log.info("Refusing to start %s: %s", self._log_name, message)
        return SpawnException(message, reason=reason, status_code=status_code)

    def _restore_options(self) -> None:
        """Bad options change nothing: put the previous stored user_options back."""
        previous = self._previous_user_options or {}
        if self.orm_spawner is not None:
            self.orm_spawner.user_options = previous
        self.user_options = previous

    async def check_quota(self, selection: Selection) -> None:
        """Refuse before any cost when ``quota_check`` says so."""
        if self.quota_check is not None:
            await maybe_future(self.quota_check(self, selection))

    def backend_hosts(self, backend: str) -> list[str]:
        """The machines a backend can run servers on (its :meth:`~.backends.base.Backend.hosts`)."""
        return backend_class(backend).hosts(self)

    def _new_backend(self, backend: str, host: str, slots: list[dict[str, Any]]) -> Backend:
        """The backend ``backend`` for this server on ``host`` with ``slots``; not configured yet."""
        cls = backend_class(backend)
        traits = {"gpu_slots": slots, "workspace_dir": self._workspace_dir(), "progress_callback": self.emit}
        return make_backend(self, cls, **traits, **cls.placement(self, host))

    def make_backend(self, selection: Selection, slots: list[GpuSlot]) -> Backend:
        """Build the backend for a selection, on the machine of its slots, configured with the selection."""
        backend = self._new_backend(selection.profile.backend, self.host_name, [s.to_dict() for s in slots])
        backend.configure(selection)
        return backend

    def _apply_own_overrides(self, overrides: dict[str, Any]) -> None:
        # Traits the hub reads from this spawner (start_timeout, http_timeout...) follow the profile too;
        # remember the old values, so the next start of another profile begins clean.
        self._restore_own_traits()
        own = {k: v for k, v in overrides.items() if self.has_trait(k) and k in self.trait_names(config=True)}
        self._saved_traits = apply_overrides(self, own)

    def _restore_own_traits(self) -> None:
        for name, value in getattr(self, "_saved_traits", {}).items():
            setattr(self, name, value)
        self._saved_traits = {}

    async def start(self) -> Any:
        """Validate, reserve, launch; every failure is a sentence and leaves nothing held."""
        self._progress_reset()
        try:
            return await self._start()
        finally:
            self._progress_done()

    async def _start(self) -> Any:
        self.kept_reason = self.kept_at = ""
        self.emit(5, "Checking your options")
        try:
            await self.check_plan(self.user_options)
            profiles = await self.get_profiles()
        except SpawnException:
            self._restore_options()
            raise
        try:
            selection = resolve_options(profiles, self.user_options, max_run_hours=self.user_max_run_hours())
        except OptionsError as e:
            self._restore_options()
            raise self._refuse(str(e), reason="invalid_options", status_code=400) from None
        await self.check_quota(selection)
        if selection.gpus:
            await self.ensure_inventory()
        normalized = selection.user_options()
        self.user_options = normalized
        if self.orm_spawner is not None:
            self.orm_spawner.user_options = normalized

        backend_cls = backend_class(selection.profile.backend)
        slots = self._allocate(selection) if selection.gpus and backend_cls.uses_gpu_slots else []
        self.profile_slug = selection.profile.slug
        self.backend_name = selection.profile.backend
        self.slot_dicts = [s.to_dict() for s in slots]
        # The machine: where its GPUs are; a CPU server goes to the backend's first machine.
        self.host_name = slots[0].host if slots else self.backend_hosts(self.backend_name)[0]
        self.stop_at = format_time(selection.stop_at) if selection.stop_at else ""
        for slot in slots:
            self.emit(15, f"Reserved GPU {slot.index} ({slot.name})")
        try:
            self._backend = self.make_backend(selection, slots)
            self._apply_own_overrides({**backend_cls.hub_timeouts(self, selection), **selection.spawner_override})
            for hook in self.pre_start_hooks:
                await maybe_future(load_hook(hook)(self))
            self.emit(30, f"Starting your server ({selection.profile.display_name})")
            url = await self._backend.start()
            if self._backend.api_token != self.api_token:
                # A backend that found its server already running reuses that server's token: tell the hub.
                self.api_token = self._backend.api_token
            self.emit(90, "Waiting for JupyterLab to answer")
            return url
        except BaseException:
            # Cancelled (start_timeout) or failed: give the GPUs back now, whatever the hub does next.
            self._release("start failed")
            raise

    async def poll(self) -> int | None:
        """None while running; an exit status otherwise, and then the slots are free again."""
        if self._backend is None:
            self._release("no server")
            return 0
        status = await self._backend.poll()
        if status is not None:
            self._release(f"server not running (status {status})")
        return status

    async def stop(self, now: bool = False) -> None:
        """Run the pre-destroy hooks, then stop the backend's server (idempotent) and free its slots.

        When a hook fails the storage is kept: the backend's ``suspend()`` (a container stopped, not removed; a pod
        stopped with its disk; a local workspace outlives its server anyway).
        """
        try:
            if self._backend is not None:
                failure = await self._run_pre_destroy_hooks("stop")
                if failure:
                    await self._backend.suspend(now=now)
                else:
                    await self._backend.stop(now=now)
        finally:
            self._release("stopped")

    async def _run_pre_destroy_hooks(self, reason: str) -> str:
        """Run ``pre_destroy_hooks``; the first failure (a sentence) is logged, kept in the state and returned."""
        for hook in self.pre_destroy_hooks:
            try:
                await maybe_future(load_hook(hook)(self, reason))
            except Exception as e:
                why = str(e) or type(e).__name__
                self.kept_reason = why
                self.kept_at = datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
                self.log.error(
                    "Server %s stopped but its storage kept: pre-destroy hook %s failed: %s", self._log_name, hook, why
                )
                self.log.debug("Pre-destroy hook %s failed", hook, exc_info=True)
                return why
        return ""

    def host_workspace(self) -> str:
        """The server's workspace folder when it is one on this machine (local backend, docker with a bind mount
        on the local engine), else "" (a named volume, a remote machine, no server)."""
        return self._backend.host_workspace() if self._backend is not None else ""

    @property
    def server_ready_hooks(self) -> list[ServerReadyHook] | None:
        """Where to register ``hook(server_url, token)`` callables the backend runs once the server answers, before
        the start ends (the sync's restore into a new pod); None when the backend runs none or there is no server."""
        return self._backend.server_ready_hooks if self._backend is not None else None

    @property
    def workspace_uid(self) -> int | None:
        """Who should own a workspace folder made for this server before it starts (None: whoever made it)."""
        return self._backend.new_workspace_uid() if self._backend is not None else None

    # ----- state ---------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """What a restarted hub and every service need (:class:`~dolab_core.serverstate.ServerState`)."""
        state = super().get_state()
        backend = self._backend
        rented = backend.monitor_state() if backend is not None and self.backend_name else {}
        state.update(
            ServerState(
                profile=self.profile_slug,
                backend=self.backend_name,
                host=self.host_name,
                slots=tuple(self.slot_dicts),
                stop_at=self.stop_at,
                backend_state=backend.get_state() if backend is not None else {},
                workspace=self.host_workspace() if self.backend_name else "",
                # The server's own address: services read it directly, not through the proxy, which would count
                # every request as the user's activity.
                server_url=self.server.url if self.server is not None and self.server.port else "",
                price_per_hour_usd=rented.get("price_per_hour_usd"),
                gpu_type=str(rented.get("gpu_type") or ""),
                gpu_count=int(rented.get("gpu_count") or 0),
                # Survives clear_state() after the stop, so the user's and admin's tools can say why.
                kept_reason=self.kept_reason,
                kept_at=self.kept_at,
            ).to_dict()
        )
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Rebuild the backend and re-claim the slots of a server that is still running."""
        super().load_state(state)
        saved = ServerState.read(state)
        self.kept_reason, self.kept_at = saved.kept_reason, saved.kept_at
        if saved.backend not in BACKENDS:
            return
        self.profile_slug = saved.profile
        self.backend_name = saved.backend
        self.slot_dicts = [dict(s) for s in saved.slots]
        self.stop_at = saved.stop_at
        self.host_name = saved.host
        self._backend = self._new_backend(saved.backend, self.host_name, self.slot_dicts)
        self._backend.load_state(dict(saved.backend_state))
        # Only a server the hub still lists holds its GPUs; stale state of a stopped one claims nothing.
        if self.slot_dicts and self.orm_spawner is not None and self.orm_spawner.server is not None:
            self._reclaim(self.slot_dicts)

    def _workspace_dir(self) -> str:
        return os.path.join(self.workspace_root, workspace_name(self.user.name))

    def clear_state(self) -> None:
        """Forget the server (the hub calls this before a start and after a stop)."""
        super().clear_state()
        if self._backend is not None:
            self._backend.clear_state()
        self._backend = None
        self._release("state cleared")
        self.profile_slug = self.backend_name = self.host_name = self.stop_at = ""
        self.slot_dicts = []

    @property
    def stop_at_datetime(self) -> datetime | None:
        """The user's hard deadline, if they chose one."""
        return parse_stop_at(self.stop_at) if self.stop_at else None
