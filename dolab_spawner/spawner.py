"""DoLabSpawner: the one spawner the hub sees.

It reads the chosen profile, validates the untrusted ``user_options``, checks plan and quota, reserves GPU slots,
hands the server to the profile's backend (a local process, a Docker container or a RunPod pod: :mod:`.backends`,
through the :class:`~.backends.base.Backend` interface, never by name), streams progress, and keeps in the spawner
state (:class:`~dolab_core.serverstate.ServerState`) everything needed to find the server again after a hub
restart. The options form is :mod:`.form`.
"""

from __future__ import annotations

import asyncio
import os
import string
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any, ClassVar

from escapism import escape
from jupyterhub.spawner import Spawner, SpawnException
from jupyterhub.utils import maybe_future
from traitlets import Any as AnyTrait
from traitlets import Callable, Dict, Float, List, TraitError, Unicode, Union, default, observe, validate

from dolab_core.gpus import LOCAL_HOST, GpuSlot, inventory_from_config, load_inventory
from dolab_core.hooks import load_hook
from dolab_core.paths import default_data_dir
from dolab_core.plans import Plan, PlanConfigError, PlanTable, parse_plans
from dolab_core.serverstate import ServerState
from dolab_lab.notice import LabNoticeTraits

from . import form
from .backends import BACKENDS, backend_class
from .backends.base import Backend, ServerReadyHook, apply_overrides, make_backend
from .backends.docker_hosts import remote_slots
from .profiles import (
    OptionsError,
    Profile,
    ProfileConfigError,
    Selection,
    default_profiles,
    format_time,
    parse_profile_list,
    parse_stop_at,
    resolve_options,
)
from .progress import ProgressEvents
from .slots import NoFreeSlot, SlotAllocator

__all__ = ["DoLabSpawner"]

_SAFE_CHARS = set(string.ascii_lowercase + string.digits)


def workspace_name(username: str) -> str:
    """A directory (or volume) name for a user: only ``[a-z0-9-]``, so no name can climb out of the root."""
    return escape(username, safe=_SAFE_CHARS, escape_char="-")


class _SlotPool:
    """The hub-wide GPU table every DoLabSpawner shares (one hub per process)."""

    #: After NVML timed out, how long to treat the host as GPU-less before asking again.
    retry_seconds = 300.0

    def __init__(self) -> None:
        self.allocator = SlotAllocator()
        self.loaded = False
        self.lock: asyncio.Lock | None = None
        self.retry_at = 0.0


class _OverrideKeys(Mapping[str, set[str]]):
    """Per backend name, the traits a profile's ``spawner_override`` may set: the spawner's and its backend's config
    traits. A backend is imported only when a profile names it."""

    def __init__(self, spawner_cls: type[Spawner]) -> None:
        self._own = set(spawner_cls.class_trait_names(config=True))

    def __getitem__(self, name: str) -> set[str]:
        if name not in BACKENDS:
            raise KeyError(name)
        return self._own | set(backend_class(name).class_trait_names(config=True))

    def __iter__(self) -> Iterator[str]:
        return iter(BACKENDS)

    def __len__(self) -> int:
        return len(BACKENDS)


class DoLabSpawner(LabNoticeTraits, ProgressEvents, Spawner):
    """Profiles, GPU slots and backends behind one spawner.

    Extension points, in the order ``start()`` uses them: :meth:`get_profiles`, :meth:`check_quota`,
    slot allocation, :meth:`make_backend`, the backend's ``start()``. Services reach the running server through
    public members only (:meth:`host_workspace`, :attr:`server_ready_hooks`, :attr:`workspace_uid`, the state).
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
        storage kept (the backend's ``suspend()`` where it has one: docker stops the container without removing
        it), the reason is logged as an error and kept in the server's state (``kept``) until its next start.
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

    _pool: ClassVar[_SlotPool] = _SlotPool()
    _backend: Backend | None = None

    # ----- configuration -------------------------------------------------------------------------------

    @default("workspace_root")
    def _default_workspace_root(self) -> str:
        return os.path.join(default_data_dir(), "workspaces")

    @validate("profile_list")
    def _validate_profile_list(self, proposal: dict) -> Any:
        value = proposal["value"]
        if not callable(value):
            try:
                self._parse_profiles(value)
            except ProfileConfigError as e:
                raise TraitError(f"DoLabSpawner.profile_list: {e}") from None
        return value

    @validate("plans")
    def _validate_plans(self, proposal: dict) -> Any:
        try:
            parse_plans(proposal["value"])
        except PlanConfigError as e:
            raise TraitError(f"DoLabSpawner.plans: {e}") from None
        return proposal["value"]

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

    @validate("gpu_inventory")
    def _validate_gpu_inventory(self, proposal: dict) -> Any:
        value = proposal["value"]
        if value is not None:
            if not isinstance(value, (list, tuple)):
                raise TraitError(
                    "DoLabSpawner.gpu_inventory must be a list of dicts with index, uuid, name and memory_gb, "
                    f"not {type(value).__name__}"
                )
            try:
                inventory_from_config(value)
            except (ValueError, TypeError) as e:
                raise TraitError(f"DoLabSpawner.gpu_inventory: {e}") from None
        return value

    @classmethod
    def override_keys(cls) -> Mapping[str, set[str]]:
        """Per backend, the trait names a profile's ``spawner_override`` may set (imports a backend when asked)."""
        return _OverrideKeys(cls)

    @classmethod
    def _parse_profiles(cls, raw: Any) -> list[Profile]:
        return parse_profile_list(raw, backends=list(BACKENDS), allowed_overrides=cls.override_keys())

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise a readable error for bad DoLabSpawner config, so the hub refuses to start on it.

        The spawner is built lazily per user, so without this a typo in ``profile_list`` would show up only
        at a user's first start. The shipped ``jupyterhub_config.py`` calls it.
        """
        cls(config=config)

    # ----- profiles and the GPU inventory --------------------------------------------------------------

    @property
    def allocator(self) -> SlotAllocator:
        """The hub-wide slot table."""
        return self._pool.allocator

    @property
    def owner(self) -> str:
        """Who holds this server's slots in the allocator."""
        return f"{self.user.name}/{self.name}"

    async def ensure_inventory(self) -> list[GpuSlot]:
        """Read the GPUs once per hub process (NVML off the event loop), shared by every spawner."""
        pool = self._pool
        if not pool.loaded and time.monotonic() >= pool.retry_at:
            if pool.lock is None:
                pool.lock = asyncio.Lock()
            async with pool.lock:
                if not pool.loaded and time.monotonic() >= pool.retry_at:
                    inventory = await load_inventory(self.gpu_inventory, self.gpu_ids, self.nvml_timeout_seconds)
                    if inventory is None:
                        pool.retry_at = time.monotonic() + pool.retry_seconds
                        return pool.allocator.inventory
                    pool.allocator.set_inventory([*inventory, *remote_slots(self.docker_hosts)])
                    pool.loaded = True
                    listed = ", ".join(f"{s.host}/{s.index}: {s.name}" for s in pool.allocator.inventory)
                    self.log.info("GPU inventory: %s", listed or "none")
        return pool.allocator.inventory

    @property
    def plan_table(self) -> PlanTable:
        """The admin's plans, parsed (checked at start-up by ``check_config``)."""
        return parse_plans(self.plans)

    def user_plan(self) -> Plan:
        """This user's plan: the combination of the plans of their JupyterHub groups."""
        groups = [g.name for g in getattr(self.user, "groups", None) or []]
        return self.plan_table.plan_for(groups)

    def user_max_run_hours(self) -> float:
        """The latest stop time this user may choose: the spawner's ``max_run_hours``, lowered by their plan's."""
        plan_hours = self.user_plan().max_run_hours
        if plan_hours is None:
            return self.max_run_hours
        return min(self.max_run_hours, plan_hours) if self.max_run_hours > 0 else plan_hours

    async def get_profiles(self) -> list[Profile]:
        """The profiles this user may choose from now: the configured ones their plan allows."""
        profiles = await self.get_all_profiles()
        plan = self.user_plan()
        allowed = [p for p in profiles if plan.allows_profile(p.slug)]
        if not allowed:
            raise SpawnException(
                "Your plan does not include any profile of this hub. Ask an administrator to add you to a group "
                "with a plan.",
                reason="plan",
                status_code=403,
            )
        return allowed

    async def check_plan(self, user_options: Any) -> None:
        """Refuse (403, a sentence) a profile that exists but that the user's plan does not include."""
        slug = user_options.get("profile") if isinstance(user_options, dict) else None
        plan = self.user_plan()
        if not isinstance(slug, str) or not slug or plan.allows_profile(slug):
            return
        profiles = await self.get_all_profiles()
        profile = next((p for p in profiles if p.slug == slug), None)
        if profile is None:
            return  # an unknown profile: resolve_options says which ones exist
        allowed = ", ".join(p.slug for p in profiles if plan.allows_profile(p.slug)) or "none"
        raise SpawnException(
            f"Your plan does not include the profile {profile.display_name!r} ({slug}). You can start: {allowed}. "
            "Ask an administrator if you need it.",
            reason="plan",
            status_code=403,
        )

    async def get_all_profiles(self) -> list[Profile]:
        """Every configured profile, before the user's plan filters them."""
        if callable(self.profile_list):
            raw = await maybe_future(self.profile_list(self))
            try:
                return self._parse_profiles(raw)
            except ProfileConfigError as e:
                self.log.error("profile_list callable returned a bad list: %s", e)
                raise SpawnException(
                    "The profile list is misconfigured. Please tell an administrator.",
                    reason="config",
                    status_code=503,
                ) from None
        if self.profile_list:
            return self._parse_profiles(self.profile_list)
        return default_profiles(await self.ensure_inventory())

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

    def _allocate(self, selection: Selection) -> list[GpuSlot]:
        """Take the GPUs (synchronously: no await between check and take) or refuse with a sentence."""
        profile = selection.profile
        try:
            slots = self.allocator.allocate(
                self.owner, selection.gpus, profile.gpu_type, profile.gpu_exact, self.backend_hosts(profile.backend)
            )
        except NoFreeSlot as e:
            kind = f"{profile.gpu_type} " if profile.gpu_type else ""
            if e.total == 0:
                message = (
                    f"There is no {kind}GPU for the profile {profile.display_name!r} here. "
                    "Pick another profile or ask an administrator."
                )
            elif e.wanted > e.total:
                message = (
                    f"There are only {e.total} {kind}GPU(s) here; the profile {profile.display_name!r} "
                    f"asks for {e.wanted}. Ask for fewer GPUs or pick another profile."
                )
            elif e.free == 0:
                message = f"All {e.total} {kind}GPU(s) are in use. Pick a CPU profile or try again when a GPU is free."
            else:
                message = (
                    f"Only {e.free} of {e.total} {kind}GPU(s) are free together on one machine; you asked for "
                    f"{e.wanted}. Ask for fewer GPUs or try again when more are free."
                )
            raise self._refuse(message, reason="no_gpu", status_code=409) from None
        self.log.info("Slot(s) allocated to %s: %s", self.owner, ", ".join(f"GPU {s.index} ({s.name})" for s in slots))
        return slots

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

    def _release(self, why: str) -> None:
        released = self.allocator.release(self.owner)
        if released:
            self.log.info("Slot(s) released by %s (%s): %s", self.owner, why, ", ".join(released))

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
            keys = [GpuSlot.from_dict(s).key for s in self.slot_dicts]
            conflicts = self.allocator.claim(self.owner, keys)
            if conflicts:
                self.log.error("%s's state claims GPU(s) another server holds: %s", self.owner, conflicts)
            else:
                self.log.info("Slot(s) re-claimed by %s from its state: %s", self.owner, ", ".join(keys))

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
