"""Profiles: what a user may start, and the validation of what they asked for.

``profile_list`` follows kubespawner's schema, so admins can reuse what they know::

    c.DoLabSpawner.profile_list = [
        {"display_name": "CPU only", "slug": "cpu", "default": True},
        {
            "display_name": "One A100",
            "slug": "a100",
            "gpus": 1,
            "gpu_type": "A100",
            "spawner_override": {"mem_limit": "32G"},
            "profile_options": {
                "env": {
                    "display_name": "Python environment",
                    "choices": {
                        "system": {"display_name": "System Python", "default": True},
                        "torch": {"display_name": "PyTorch", "spawner_override": {"python_env": "/opt/torch"}},
                    },
                }
            },
        },
    ]

Everything here is pure: config in, data out, errors as sentences. The spawner turns
:class:`ProfileConfigError` into a start-up error. What a user asks of these profiles is checked in
:mod:`.options`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dolab_core.gpus import GpuSlot

__all__ = [
    "RESERVED_KEYS",
    "Choice",
    "Profile",
    "ProfileConfigError",
    "ProfileOption",
    "RunPodOffer",
    "default_profiles",
    "parse_profile_list",
    "slugify",
]

#: user_options keys that are not profile options.
RESERVED_KEYS = ("profile", "gpus", "run_hours", "stop_at", "gpu_type", "max_price_per_hour")
_PROFILE_KEYS = {
    "slug",
    "display_name",
    "description",
    "default",
    "backend",
    "gpus",
    "gpu_type",
    "spawner_override",
    "profile_options",
    "runpod",
}
_RUNPOD_KEYS = {
    "gpu_types",
    "cloud_type",
    "image",
    "container_disk_gb",
    "volume_gb",
    "volume_mount_path",
    "network_volume_id",
    "max_price_per_hour",
}
_CLOUD_TYPES = ("secure", "community", "all")
_OPTION_KEYS = {"display_name", "choices"}
_CHOICE_KEYS = {"display_name", "description", "default", "spawner_override"}
_OPTION_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
# No "--": the form names option fields profile-option-<slug>--<option>.
_SLUG = re.compile(r"[a-z0-9](?:[a-z0-9_]|-(?!-)){0,62}")


class ProfileConfigError(ValueError):
    """The admin's ``profile_list`` is wrong; the message says where and how."""


@dataclass(frozen=True)
class Choice:
    """One value of a profile option."""

    slug: str
    display_name: str
    description: str = ""
    default: bool = False
    spawner_override: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProfileOption:
    """A list of choices inside a profile (an image, a Python environment...)."""

    name: str
    display_name: str
    choices: tuple[Choice, ...]

    @property
    def default_choice(self) -> Choice:
        """The choice marked default, else the first."""
        return next((c for c in self.choices if c.default), self.choices[0])

    def choice(self, slug: str) -> Choice | None:
        """The choice called ``slug``, or None."""
        return next((c for c in self.choices if c.slug == slug), None)


@dataclass(frozen=True)
class RunPodOffer:
    """What a ``backend: runpod`` profile rents: GPU types in order of preference, where, from which image."""

    gpu_types: tuple[str, ...]
    image: str
    cloud_type: str = "secure"  # secure, community or all
    container_disk_gb: int = 20
    volume_gb: int = 0
    volume_mount_path: str = "/workspace"
    network_volume_id: str = ""
    #: USD per hour for the whole pod (all its GPUs); 0: no maximum.
    max_price_per_hour: float = 0.0


@dataclass(frozen=True)
class Profile:
    """What a user can start: a backend, a number of GPUs of a type, and trait overrides."""

    slug: str
    display_name: str
    description: str = ""
    default: bool = False
    backend: str = "local"
    gpus: int = 0
    gpu_type: str = ""
    spawner_override: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[ProfileOption, ...] = ()
    #: Match ``gpu_type`` as the whole GPU name (generated profiles: "RTX 4090" must not take a "RTX 4090 D").
    gpu_exact: bool = False
    #: For ``backend: runpod``: what to rent.
    runpod: RunPodOffer | None = None

    def option(self, name: str) -> ProfileOption | None:
        """The option called ``name``, or None."""
        return next((o for o in self.options if o.name == name), None)

    @property
    def allowed_keys(self) -> list[str]:
        """The user_options keys this profile accepts."""
        keys = ["profile", *(o.name for o in self.options), "gpus", "run_hours", "stop_at"]
        if self.runpod is not None:
            keys += ["gpu_type", "max_price_per_hour"]
        return keys


def slugify(text: str) -> str:
    """A lower-case slug of ``[a-z0-9-]``, as kubespawner derives a missing profile slug."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.casefold()).strip("-")
    return slug or "profile"


def _text(value: Any, where: str, key: str, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ProfileConfigError(f"{where}: {key} must be a {'non-empty ' if required else ''}string, not {value!r}")
    return value


def _bool(value: Any, where: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise ProfileConfigError(f"{where}: {key} must be true or false, not {value!r}")
    return value


def _overrides(value: Any, where: str, allowed: Collection[str] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ProfileConfigError(f"{where}: spawner_override must be a dict of trait names to values")
    if allowed is not None:
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ProfileConfigError(
                f"{where}: spawner_override sets {', '.join(unknown)}, which the spawner does not have"
            )
    return dict(value)


def _unknown_keys(entry: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ProfileConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}"
        )


def _parse_option(name: Any, raw: Any, where: str, allowed_overrides: Collection[str] | None) -> ProfileOption:
    if not isinstance(name, str) or not _OPTION_NAME.fullmatch(name) or name in RESERVED_KEYS:
        raise ProfileConfigError(
            f"{where}: option name {name!r} must be lower-case letters, digits and _ (starting with a letter),"
            f" and not one of {', '.join(RESERVED_KEYS)}"
        )
    where = f"{where}, option {name!r}"
    if not isinstance(raw, Mapping):
        raise ProfileConfigError(f"{where}: must be a dict with display_name and choices")
    _unknown_keys(raw, _OPTION_KEYS, where)
    raw_choices = raw.get("choices")
    if not isinstance(raw_choices, Mapping) or not raw_choices:
        raise ProfileConfigError(f"{where}: choices must be a non-empty dict of slug -> choice")
    choices = []
    for slug, entry in raw_choices.items():
        cwhere = f"{where}, choice {slug!r}"
        if not isinstance(slug, str) or not slug:
            raise ProfileConfigError(f"{cwhere}: a choice's key must be a non-empty string")
        if not isinstance(entry, Mapping):
            raise ProfileConfigError(f"{cwhere}: must be a dict with display_name")
        _unknown_keys(entry, _CHOICE_KEYS, cwhere)
        choices.append(
            Choice(
                slug=slug,
                display_name=_text(entry.get("display_name", slug), cwhere, "display_name", required=True),
                description=_text(entry.get("description"), cwhere, "description"),
                default=_bool(entry.get("default", False), cwhere, "default"),
                spawner_override=_overrides(entry.get("spawner_override"), cwhere, allowed_overrides),
            )
        )
    if sum(c.default for c in choices) > 1:
        raise ProfileConfigError(f"{where}: only one choice may say default: True")
    display = _text(raw.get("display_name", name), where, "display_name", required=True)
    return ProfileOption(name=name, display_name=display, choices=tuple(choices))


def _number(value: Any, where: str, key: str, minimum: float = 0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ProfileConfigError(f"{where}: {key} must be a number of at least {minimum:g}, not {value!r}")
    return value


def _parse_runpod(raw: Any, where: str) -> RunPodOffer:
    where = f"{where}, runpod"
    if not isinstance(raw, Mapping):
        raise ProfileConfigError(f"{where}: must be a dict with gpu_types and image")
    _unknown_keys(raw, _RUNPOD_KEYS, where)
    gpu_types = raw.get("gpu_types")
    if isinstance(gpu_types, str):
        gpu_types = [gpu_types]
    if (
        not isinstance(gpu_types, (list, tuple))
        or not gpu_types
        or not all(isinstance(g, str) and g.strip() for g in gpu_types)
        or len(set(gpu_types)) != len(gpu_types)
    ):
        raise ProfileConfigError(
            f"{where}: gpu_types must be a list of RunPod GPU type ids in order of preference, each once, such as"
            ' ["NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3"]'
        )
    cloud_type = raw.get("cloud_type", "secure")
    if cloud_type not in _CLOUD_TYPES:
        raise ProfileConfigError(f"{where}: cloud_type must be one of {', '.join(_CLOUD_TYPES)}, not {cloud_type!r}")
    disk = _number(raw.get("container_disk_gb", 20), where, "container_disk_gb", 1)
    volume = _number(raw.get("volume_gb", 0), where, "volume_gb")
    if int(disk) != disk or int(volume) != volume:
        raise ProfileConfigError(f"{where}: container_disk_gb and volume_gb must be whole numbers of GB")
    mount = _text(raw.get("volume_mount_path", "/workspace"), where, "volume_mount_path", required=True)
    if not mount.startswith("/"):
        raise ProfileConfigError(f"{where}: volume_mount_path must be an absolute path, not {mount!r}")
    return RunPodOffer(
        gpu_types=tuple(gpu_types),
        image=_text(raw.get("image"), where, "image", required=True),
        cloud_type=cloud_type,
        container_disk_gb=int(disk),
        volume_gb=int(volume),
        volume_mount_path=mount,
        network_volume_id=_text(raw.get("network_volume_id"), where, "network_volume_id"),
        max_price_per_hour=float(_number(raw.get("max_price_per_hour", 0), where, "max_price_per_hour")),
    )


def parse_profile_list(
    raw: Any,
    backends: Collection[str] = ("local",),
    allowed_overrides: Mapping[str, Collection[str]] | None = None,
) -> list[Profile]:
    """Check an admin's ``profile_list`` and turn it into :class:`Profile` objects.

    ``backends`` are the backend names this install knows; ``allowed_overrides`` maps each backend to the trait
    names a ``spawner_override`` may set (None: do not check). Raises :class:`ProfileConfigError`.
    """
    if not isinstance(raw, (list, tuple)):
        raise ProfileConfigError(f"profile_list must be a list of dicts, not {type(raw).__name__}")
    profiles = [_parse_profile(entry, f"profile_list[{i}]", backends, allowed_overrides) for i, entry in enumerate(raw)]
    slugs = [p.slug for p in profiles]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates:
        raise ProfileConfigError(f"profile_list: slug(s) {', '.join(duplicates)} used more than once")
    if sum(p.default for p in profiles) > 1:
        raise ProfileConfigError("profile_list: only one profile may say default: True")
    return profiles


def _parse_profile(
    entry: Any, where: str, backends: Collection[str], allowed_overrides: Mapping[str, Collection[str]] | None
) -> Profile:
    if not isinstance(entry, Mapping):
        raise ProfileConfigError(f"{where}: each profile must be a dict, not {type(entry).__name__}")
    _unknown_keys(entry, _PROFILE_KEYS, where)
    display = _text(entry.get("display_name"), where, "display_name", required=True)
    slug = _text(entry.get("slug", slugify(display)), where, "slug", required=True)
    if not _SLUG.fullmatch(slug):
        raise ProfileConfigError(f"{where}: slug {slug!r} must be lower-case letters, digits, - and _ (no '--')")
    where = f"profile {slug!r}"
    backend = entry.get("backend", "local")
    if backend not in backends:
        available = ", ".join(backends)
        raise ProfileConfigError(f"{where}: backend {backend!r} is not available; this install has: {available}")
    gpus = entry.get("gpus", 0)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or not 0 <= gpus <= 64:
        raise ProfileConfigError(f"{where}: gpus must be a whole number from 0 to 64, not {gpus!r}")
    gpu_type = _text(entry.get("gpu_type"), where, "gpu_type")
    if gpu_type and not gpus:
        raise ProfileConfigError(f"{where}: gpu_type is set but gpus is 0; set gpus to 1 or more")
    runpod = _runpod_offer(entry, backend, gpus, gpu_type, where)
    allowed = None if allowed_overrides is None else allowed_overrides.get(backend, ())
    raw_options = entry.get("profile_options") or {}
    if not isinstance(raw_options, Mapping):
        raise ProfileConfigError(f"{where}: profile_options must be a dict of option name -> option")
    return Profile(
        slug=slug,
        display_name=display,
        description=_text(entry.get("description"), where, "description"),
        default=_bool(entry.get("default", False), where, "default"),
        backend=backend,
        gpus=gpus,
        gpu_type=gpu_type,
        spawner_override=_overrides(entry.get("spawner_override"), where, allowed),
        options=tuple(_parse_option(n, o, where, allowed) for n, o in raw_options.items()),
        runpod=runpod,
    )


def _runpod_offer(entry: Mapping[str, Any], backend: str, gpus: int, gpu_type: str, where: str) -> RunPodOffer | None:
    """A ``backend: runpod`` profile's ``runpod`` settings (its GPU types, not ``gpu_type``); None for the others,
    which may not have any."""
    if backend != "runpod":
        if "runpod" in entry:
            raise ProfileConfigError(f"{where}: runpod settings are only for backend: runpod")
        return None
    runpod = _parse_runpod(entry.get("runpod"), where)
    if gpu_type:
        raise ProfileConfigError(f"{where}: a runpod profile lists its GPU types in runpod.gpu_types, not in gpu_type")
    if not gpus:
        raise ProfileConfigError(f"{where}: a runpod profile needs gpus (the GPU count per pod) of 1 or more")
    return runpod


def default_profiles(inventory: Iterable[GpuSlot]) -> list[Profile]:
    """With no ``profile_list``: "CPU only" plus one one-GPU profile per GPU model found."""
    profiles = [Profile(slug="cpu", display_name="CPU only", description="JupyterLab without a GPU.", default=True)]
    by_name: dict[str, list[GpuSlot]] = {}
    for slot in inventory:
        by_name.setdefault(slot.name, []).append(slot)
    for name, slots in by_name.items():
        memory = max(s.memory_gb for s in slots)
        memory_text = f" with {memory:g} GB of memory" if memory else ""
        profiles.append(
            Profile(
                slug=f"gpu-{slugify(name)}",
                display_name=f"One {name}",
                description=f"JupyterLab with one {name}{memory_text}.",
                gpus=1,
                gpu_type=name,
                gpu_exact=True,
            )
        )
    return profiles
