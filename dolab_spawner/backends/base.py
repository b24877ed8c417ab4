"""The backend interface (:class:`Backend`), how DoLabSpawner builds one, and how a server is pinned to its GPUs.

A backend is a JupyterHub ``Spawner`` subclass (so it can reuse LocalProcessSpawner, DockerSpawner, ...) that
DoLabSpawner creates per server and delegates the process, container or pod to. The hub only ever sees
DoLabSpawner; :func:`make_backend` passes the backend everything the hub gave DoLabSpawner, which is what
wrapspawner forgot (``orm_spawner``, the token, the OAuth client, the server), except ``user_options``: a backend
gets the validated selection (:meth:`Backend.configure`), never what a user sent.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from jupyterhub.spawner import Spawner
from traitlets import Any as AnyTrait
from traitlets import Dict, HasTraits, List, Unicode
from traitlets.config import Config

from dolab_core.gpus import LOCAL_HOST, GpuSlot

__all__ = [
    "HUB_PROVIDED_ATTRS",
    "Backend",
    "ServerReadyHook",
    "apply_overrides",
    "child_config",
    "gpu_environment",
    "http_answers",
    "make_backend",
]

#: Attributes the hub sets on a spawner (at construction or before start) that a backend needs as well.
HUB_PROVIDED_ATTRS = (
    "user",
    "orm_spawner",
    "hub",
    "authenticator",
    "_deprecated_db_session",
    "proxy_spec",
    "oauth_client_id",
    "cookie_options",
    "cookie_host_prefix_enabled",
    "trusted_alt_names",
    "public_url",
    "public_hub_url",
    "api_token",
    "admin_access",
    "internal_ssl",
    "internal_trust_bundles",
    "internal_certs_location",
    "cert_paths",
    "handler",
)

B = TypeVar("B", bound=Spawner)


def gpu_environment(slots: Sequence[GpuSlot]) -> dict[str, str]:
    """The variables that pin a server to exactly its GPUs (and to none for a CPU profile).

    UUIDs rather than indices: CUDA's default device order is not NVML's, a UUID names one GPU either way.
    """
    if not slots:
        # An empty CUDA_VISIBLE_DEVICES hides every GPU from CUDA; "void" tells the NVIDIA container runtime
        # to inject nothing.
        return {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void", "DOLAB_GPUS": ""}
    ids = ",".join(s.uuid if s.uuid.startswith(("GPU-", "MIG-")) else str(s.index) for s in slots)
    return {
        "CUDA_VISIBLE_DEVICES": ids,
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "NVIDIA_VISIBLE_DEVICES": ids,
        "DOLAB_GPUS": ",".join(s.name for s in slots),
    }


if TYPE_CHECKING:
    from ..options import Selection
    from ..profiles import Profile
    from ..spawner import DoLabSpawner

    _MixinBase = Spawner
else:
    # Not Spawner itself: JupyterHub refuses Spawner subclasses without start/stop/poll.
    _MixinBase = HasTraits

#: ``hook(server_url, token)``, run by a backend once its server answers (see :attr:`Backend.server_ready_hooks`).
ServerReadyHook = Callable[[str, str], Awaitable[Any]]


class Backend(_MixinBase):  # type: ignore[valid-type,misc]
    """What DoLabSpawner asks of every backend; mix in before a Spawner class (``class X(Backend, Spawner)``).

    A backend is registered by name in :data:`dolab_spawner.backends.BACKENDS`. DoLabSpawner uses, in this order:

    1. before a server exists (class methods, no backend built): :meth:`hosts` (the machines, so the slots, it can
       use), :meth:`hub_timeouts` (``start_timeout``/``http_timeout`` for the hub) and :meth:`form_prices`;
    2. :func:`make_backend` with :meth:`placement` (what the backend needs of the spawner to run on one of its
       hosts), then :meth:`configure` with the validated :class:`~dolab_spawner.options.Selection` (a backend never
       sees the raw ``user_options``);
    3. the Spawner's ``start``/``poll``/``stop``, and :meth:`suspend` instead of ``stop`` when a pre-destroy hook
       failed; :attr:`server_ready_hooks` for the services' hooks that need the running server;
    4. for the spawner's state: :meth:`host_workspace`, :meth:`monitor_state`, and the Spawner's
       ``get_state``/``load_state``/``clear_state`` (kept under the state's ``backend_state``).
    """

    gpu_slots: List[dict] = List(help="The GPUs this server holds, as GpuSlot dicts (set by DoLabSpawner).")
    workspace_dir = Unicode(help="The user's workspace on this host (set by DoLabSpawner).")
    extra_env = Dict(help="Variables DoLabSpawner adds last, over `environment` (GPU pinning).")
    progress_callback: Any = AnyTrait(None, allow_none=True, help="DoLabSpawner.emit, for progress events.")

    #: Whether this backend's servers hold GPU slots of DoLabSpawner's allocator (RunPod rents its own GPUs).
    uses_gpu_slots: ClassVar[bool] = True

    # ----- before a server exists ----------------------------------------------------------------------

    @classmethod
    def hosts(cls, spawner: DoLabSpawner) -> list[str]:
        """The machines this backend runs servers on, first the one for a server without GPUs; the slot
        allocator takes GPUs only on these. Default: this machine."""
        return [LOCAL_HOST]

    @classmethod
    def hub_timeouts(cls, spawner: DoLabSpawner, selection: Selection) -> dict[str, float]:
        """``start_timeout``/``http_timeout`` the hub should use for a server of ``selection`` (empty: the
        spawner's own). Read before ``start()`` (the hub reads ``start_timeout`` first), so without a backend."""
        return {}

    @classmethod
    async def form_prices(cls, spawner: DoLabSpawner, profile: Profile) -> list[dict[str, Any]] | None:
        """The options form's live prices for ``profile``: per offered GPU type ``{"id", "name", "price"}`` (USD
        per server-hour, None when unknown); None (default) for a backend without prices."""
        return None

    @classmethod
    def configured_value(cls, spawner: DoLabSpawner, selection: Selection, name: str) -> Any:
        """A trait's value for a server of ``selection`` without building a backend: the profile's override, else
        the config as :func:`make_backend` gives it (``c.DoLabSpawner`` lines, then the backend's own sections),
        else the trait's default. For traits with a plain default (no ``@default`` method)."""
        if name in selection.spawner_override:
            return selection.spawner_override[name]
        config = child_config(spawner.config, cls, type(spawner))
        merged = Config()
        for section in cls.section_names():
            if config._has_section(section):
                merged.merge(config[section])
        return merged[name] if name in merged else cls.class_traits()[name].default()

    @classmethod
    def placement(cls, spawner: DoLabSpawner, host: str) -> dict[str, Any]:
        """The traits a backend needs of the spawner to run on ``host`` (one of :meth:`hosts`); default none."""
        return {}

    # ----- one server ----------------------------------------------------------------------------------

    def configure(self, selection: Selection) -> None:
        """Take what the user chose: the profile's and the chosen options' ``spawner_override``."""
        apply_overrides(self, selection.spawner_override)

    async def suspend(self, now: bool = False) -> None:
        """Stop the server keeping its storage (a pre-destroy hook, the final backup, failed). Default:
        ``stop()``, for a backend whose storage outlives its server anyway (a folder on a machine)."""
        await self.stop(now=now)

    @property
    def server_ready_hooks(self) -> list[ServerReadyHook] | None:
        """Async ``hook(server_url, token)`` callables that ``start()`` runs once the server answers, before it
        returns (``server_url`` is the server's own address with its base URL); a hook that raises fails the start.
        None (default): this backend runs none, its workspace is on a machine the pre-start hooks reach."""
        return None

    def host_workspace(self) -> str:
        """The server's workspace when it is a folder on the hub's machine, else "" (a volume, another machine)."""
        return ""

    def new_workspace_uid(self) -> int | None:
        """Who should own a workspace folder made for this server before it starts (None: whoever made it)."""
        return None

    def monitor_state(self) -> dict[str, Any]:
        """Keys DoLabSpawner adds to its state for the monitor (RunPod: ``price_per_hour_usd``, ``gpu_type``,
        ``gpu_count``); empty for servers on the hub's own GPU slots."""
        return {}

    @property
    def slots(self) -> list[GpuSlot]:
        """The held GPUs as :class:`GpuSlot` objects."""
        return [GpuSlot.from_dict(s) for s in self.gpu_slots]

    def get_env(self) -> dict[str, str]:
        """The hub's variables and the admin's ``environment``, then DO-LAB's, which nothing may override."""
        env = super().get_env()
        env.update(gpu_environment(self.slots))
        env.update(self.extra_env)
        return env


async def http_answers(ip: str, port: int, path: str, timeout_seconds: float = 2) -> bool:
    """Whether an HTTP server answers at ``ip:port`` (any status). A port that accepts and closes, as Docker's
    userland proxy does for a container that is not listening yet, does not count."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout_seconds)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        await writer.drain()
        first = await asyncio.wait_for(reader.read(5), timeout_seconds)
        return first == b"HTTP/"
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()


def child_config(config: Config, child_cls: type[HasTraits], parent_cls: type[HasTraits]) -> Config:
    """The config a backend is built with.

    ``c.DoLabSpawner.<trait>`` lines an admin wrote apply to every backend (it is the spawner they configured),
    except where a section of the backend's own classes sets the same trait: ``c.LocalProcessSpawner.cmd`` or
    ``c.DockerSpawner.image`` speak about one backend, so they win.
    """
    config = copy.deepcopy(config)
    child_traits = set(child_cls.class_trait_names(config=True))
    shared = set(parent_cls.mro()) & set(child_cls.mro())
    specific = [cls.__name__ for cls in child_cls.mro() if cls not in shared and cls.__name__ in config]
    inherited = Config()
    # DoLabSpawner's section, then an admin's subclass of it (more derived wins, as traitlets does).
    for cls in reversed(parent_cls.mro()):
        if cls in shared or cls.__name__ not in config:
            continue
        for key, value in config[cls.__name__].items():
            if key in child_traits and not any(key in config[name] for name in specific):
                inherited[key] = value
    inherited.merge(config.get(child_cls.__name__, Config()))
    config[child_cls.__name__] = inherited
    return config


def apply_overrides(obj: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set a profile's ``spawner_override`` on ``obj`` where it has the trait; returns the old values.

    Dict traits are merged (kubespawner's rule), everything else is replaced.
    """
    previous: dict[str, Any] = {}
    for name, value in overrides.items():
        if not obj.has_trait(name):
            continue
        current = getattr(obj, name)
        previous[name] = current
        if isinstance(obj.traits()[name], Dict) and isinstance(value, Mapping) and isinstance(current, Mapping):
            value = {**current, **value}
        setattr(obj, name, copy.deepcopy(value))
    return previous


def make_backend(parent: Spawner, backend_cls: type[B], **traits: Any) -> B:
    """Create ``backend_cls`` for the same server as ``parent``, with the hub's attributes and ``traits``."""
    kwargs = {name: getattr(parent, name) for name in HUB_PROVIDED_ATTRS if hasattr(parent, name)}
    kwargs.update(traits)
    return backend_cls(config=child_config(parent.config, backend_cls, type(parent)), **kwargs)
