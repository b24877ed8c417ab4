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
:class:`ProfileConfigError` into a start-up error and :class:`OptionsError` into an HTTP 400.

``user_options`` come from anyone who may spawn (the REST API takes any JSON), so every number is compared before
it is converted (a 400-digit int has no float), text is read as a number or time only up to :data:`MAX_TEXT_CHARS`,
a stop time is at most :data:`MAX_RUN_HOURS_EVER` ahead even without a maximum, and a refusal quotes at most a
short piece of what was sent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from dolab_core.gpus import GpuSlot
from dolab_core.text import shown
from dolab_core.times import format_time

__all__ = [
    "MAX_OPTION_KEYS",
    "MAX_RUN_HOURS_EVER",
    "MAX_TEXT_CHARS",
    "RESERVED_KEYS",
    "Choice",
    "OptionsError",
    "Profile",
    "ProfileConfigError",
    "ProfileOption",
    "RunPodOffer",
    "Selection",
    "default_profiles",
    "parse_profile_list",
    "parse_stop_at",
    "resolve_options",
    "slugify",
]

#: user_options keys that are not profile options.
RESERVED_KEYS = ("profile", "gpus", "run_hours", "stop_at", "gpu_type", "max_price_per_hour")
#: The longest text read as a number, a time or a GPU count; a longer one is refused unread.
MAX_TEXT_CHARS = 64
#: The most keys a user_options object may have (a profile takes the reserved keys plus its options).
MAX_OPTION_KEYS = 64
#: How far ahead a stop time may be even when no maximum is set (about 11 years): bounds every hour count sent.
MAX_RUN_HOURS_EVER = 100_000

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


class OptionsError(ValueError):
    """A user's options are not allowed; the message says what is."""


def _option_number(value: Any) -> float | None:
    """A user_options number (a JSON number, or the form's text) as a float; None when it is not one. An int too
    large for a float becomes an infinity, so callers refuse it as not finite instead of overflowing."""
    if isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_TEXT_CHARS:
            return None
        try:
            return float(text)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


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


@dataclass(frozen=True)
class Selection:
    """A validated request: the profile, its option choices, the GPU count and the stop time."""

    profile: Profile
    choices: Mapping[str, Choice]
    gpus: int
    stop_at: datetime | None
    run_hours: float | None = None
    #: RunPod profiles: the GPU type the user picked (tried first), and their own price cap (USD per pod-hour).
    gpu_type: str | None = None
    max_price_per_hour: float | None = None

    @property
    def gpu_types(self) -> tuple[str, ...]:
        """RunPod profiles: the GPU types to try, in order (the user's pick first, then the profile's fallbacks)."""
        offered = self.profile.runpod.gpu_types if self.profile.runpod else ()
        if self.gpu_type:
            return (self.gpu_type, *(g for g in offered if g != self.gpu_type))
        return offered

    @property
    def price_cap_per_hour(self) -> float:
        """The highest price per pod-hour to accept (the user's cap, else the profile's; 0: none)."""
        if self.max_price_per_hour is not None:
            return self.max_price_per_hour
        return self.profile.runpod.max_price_per_hour if self.profile.runpod else 0.0

    @property
    def spawner_override(self) -> dict[str, Any]:
        """The profile's overrides, then each chosen option's: dicts merge, other values are replaced."""
        merged: dict[str, Any] = dict(self.profile.spawner_override)
        for option in self.profile.options:
            for key, value in self.choices[option.name].spawner_override.items():
                current = merged.get(key)
                if isinstance(current, Mapping) and isinstance(value, Mapping):
                    value = {**current, **value}
                merged[key] = value
        return merged

    def user_options(self) -> dict[str, Any]:
        """The normalised user_options to store: the admin page shows ``profile``."""
        options: dict[str, Any] = {"profile": self.profile.slug}
        options.update({name: choice.slug for name, choice in self.choices.items()})
        if self.profile.gpus:
            options["gpus"] = self.gpus
        if self.run_hours is not None:
            options["run_hours"] = self.run_hours
        if self.stop_at is not None:
            options["stop_at"] = format_time(self.stop_at)
        if self.gpu_type is not None:
            options["gpu_type"] = self.gpu_type
        if self.max_price_per_hour is not None:
            options["max_price_per_hour"] = self.max_price_per_hour
        return options


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
    profiles: list[Profile] = []
    for i, entry in enumerate(raw):
        where = f"profile_list[{i}]"
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
            raise ProfileConfigError(
                f"{where}: backend {backend!r} is not available; this install has: {', '.join(backends)}"
            )
        gpus = entry.get("gpus", 0)
        if not isinstance(gpus, int) or isinstance(gpus, bool) or not 0 <= gpus <= 64:
            raise ProfileConfigError(f"{where}: gpus must be a whole number from 0 to 64, not {gpus!r}")
        gpu_type = _text(entry.get("gpu_type"), where, "gpu_type")
        if gpu_type and not gpus:
            raise ProfileConfigError(f"{where}: gpu_type is set but gpus is 0; set gpus to 1 or more")
        runpod = None
        if backend == "runpod":
            runpod = _parse_runpod(entry.get("runpod"), where)
            if gpu_type:
                raise ProfileConfigError(
                    f"{where}: a runpod profile lists its GPU types in runpod.gpu_types, not in gpu_type"
                )
            if not gpus:
                raise ProfileConfigError(f"{where}: a runpod profile needs gpus (the GPU count per pod) of 1 or more")
        elif "runpod" in entry:
            raise ProfileConfigError(f"{where}: runpod settings are only for backend: runpod")
        allowed = None if allowed_overrides is None else allowed_overrides.get(backend, ())
        raw_options = entry.get("profile_options") or {}
        if not isinstance(raw_options, Mapping):
            raise ProfileConfigError(f"{where}: profile_options must be a dict of option name -> option")
        profiles.append(
            Profile(
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
        )
    slugs = [p.slug for p in profiles]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates:
        raise ProfileConfigError(f"profile_list: slug(s) {', '.join(duplicates)} used more than once")
    if sum(p.default for p in profiles) > 1:
        raise ProfileConfigError("profile_list: only one profile may say default: True")
    return profiles


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


def parse_stop_at(value: Any) -> datetime:
    """Parse an ISO 8601 time; a time without offset is taken as UTC. Raises :class:`OptionsError`."""
    if not isinstance(value, str):
        raise OptionsError(f"stop_at must be an ISO 8601 time string such as 2030-01-31T18:00:00Z, not {shown(value)}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError("too long to be a time")
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise OptionsError(
            f"stop_at {shown(value)} is not an ISO 8601 time; write it like 2030-01-31T18:00:00Z (UTC)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError:
        raise OptionsError(f"stop_at {shown(value)} is too far ahead") from None


def _pick_profile(profiles: list[Profile], value: Any) -> Profile:
    slugs = ", ".join(p.slug for p in profiles)
    if value is None or value == "":
        return next((p for p in profiles if p.default), profiles[0])
    if not isinstance(value, str):
        raise OptionsError(f"profile must be a string, one of: {slugs}")
    for profile in profiles:
        if profile.slug == value:
            return profile
    raise OptionsError(f"Unknown profile {shown(value)}. Choose one of: {slugs}.")


def _pick_gpus(profile: Profile, value: Any) -> int:
    if value is None:
        return profile.gpus
    if not isinstance(value, int) or isinstance(value, bool):
        text = value.strip() if isinstance(value, str) else ""
        # Bounded before int(): past 4300 digits int() raises, and no profile has a 9-digit GPU count.
        if text and len(text) <= 8 and text.isascii() and text.isdecimal():
            value = int(text)
        else:
            raise OptionsError(f"gpus must be a whole number from 1 to {profile.gpus}, not {shown(value)}")
    if not profile.gpus:
        if value == 0:
            return 0
        raise OptionsError(f"Profile {profile.slug!r} has no GPUs; leave gpus out or pick a GPU profile.")
    if not 1 <= value <= profile.gpus:
        raise OptionsError(
            f"Profile {profile.slug!r} gives at most {profile.gpus} GPU(s); ask for 1 to {profile.gpus}, "
            f"not {shown(value)}."
        )
    return value


def _pick_stop_at(
    options: Mapping[str, Any], now: datetime, max_run_hours: float
) -> tuple[datetime | None, float | None]:
    limit = f"at most {max_run_hours:g} hours from now" if max_run_hours > 0 else "in the future"
    raw_hours = options.get("run_hours")
    if raw_hours is not None and raw_hours != "":
        run_hours = _option_number(raw_hours)
        if run_hours is None or not math.isfinite(run_hours):
            raise OptionsError(f"run_hours must be a number of hours, not {shown(raw_hours)}")
        if run_hours <= 0:
            raise OptionsError("run_hours must be more than 0")
        if max_run_hours > 0 and run_hours > max_run_hours:
            raise OptionsError(f"You can run a server for at most {max_run_hours:g} hours, not {run_hours:g}.")
        if run_hours > MAX_RUN_HOURS_EVER:
            raise OptionsError(f"run_hours {run_hours:g} is too far ahead; ask for at most {MAX_RUN_HOURS_EVER} hours.")
        try:
            return now + timedelta(hours=run_hours), float(run_hours)
        except OverflowError:
            raise OptionsError(f"run_hours {run_hours:g} is too far ahead") from None
    raw = options.get("stop_at")
    if raw is None or raw == "":
        return None, None
    stop_at = parse_stop_at(raw)
    if stop_at <= now + timedelta(minutes=1):
        raise OptionsError(f"The stop time {format_time(stop_at)} is in the past; choose a time {limit} (UTC).")
    if max_run_hours > 0 and stop_at > now + timedelta(hours=max_run_hours):
        raise OptionsError(f"The stop time {format_time(stop_at)} is too far ahead; choose a time {limit} (UTC).")
    return stop_at, None


def _pick_runpod(profile: Profile, options: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """A RunPod profile's ``gpu_type`` (one of its GPU types) and ``max_price_per_hour`` (up to its maximum)."""
    assert profile.runpod is not None
    offer = profile.runpod
    gpu_type = options.get("gpu_type")
    if gpu_type is None or gpu_type == "":
        gpu_type = None
    elif not isinstance(gpu_type, str) or gpu_type not in offer.gpu_types:
        raise OptionsError(
            f"{shown(gpu_type)} is not a GPU type of profile {profile.slug!r}; "
            f"choose one of: {', '.join(offer.gpu_types)}."
        )
    raw_price = options.get("max_price_per_hour")
    if raw_price is None or raw_price == "":
        return gpu_type, None
    price = _option_number(raw_price)
    if price is None and isinstance(raw_price, str):
        raise OptionsError(f"max_price_per_hour must be a number of USD per hour, not {shown(raw_price)}")
    if price is None or not math.isfinite(price) or price <= 0:
        raise OptionsError(f"max_price_per_hour must be a number of USD per hour above 0, not {shown(raw_price)}")
    if offer.max_price_per_hour and price > offer.max_price_per_hour:
        raise OptionsError(
            f"You can pay at most ${offer.max_price_per_hour:g} per hour with profile {profile.slug!r}, not ${price:g}."
        )
    return gpu_type, float(price)


def resolve_options(
    profiles: list[Profile],
    user_options: Any,
    now: datetime | None = None,
    max_run_hours: float = 0,
) -> Selection:
    """Validate untrusted ``user_options`` (from the form or the REST API) against ``profiles``.

    ``{}`` selects the default profile with its default choices. ``run_hours``, when given, wins over
    ``stop_at``: stored options are reused at the next start, and a relative time stays valid where an
    absolute one would have passed. ``max_run_hours`` of 0 means no maximum. Raises :class:`OptionsError`.
    """
    if not profiles:
        raise OptionsError("No profiles are configured; ask an administrator to set profile_list.")
    if user_options is None:
        user_options = {}
    if not isinstance(user_options, Mapping):
        raise OptionsError('user_options must be a JSON object such as {"profile": "cpu"}')
    if len(user_options) > MAX_OPTION_KEYS:
        raise OptionsError(f"user_options has {len(user_options)} keys; a profile takes at most {MAX_OPTION_KEYS}.")
    now = now or datetime.now(timezone.utc)
    profile = _pick_profile(profiles, user_options.get("profile"))
    unknown = sorted(set(user_options) - set(profile.allowed_keys), key=str)
    if unknown:
        named = ", ".join(shown(key) for key in unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise OptionsError(
            f"Unknown option(s) {named} for profile {profile.slug!r}; allowed: {', '.join(profile.allowed_keys)}."
        )
    choices: dict[str, Choice] = {}
    for option in profile.options:
        value = user_options.get(option.name)
        if value is None or value == "":
            choices[option.name] = option.default_choice
            continue
        choice = option.choice(value) if isinstance(value, str) else None
        if choice is None:
            allowed = ", ".join(c.slug for c in option.choices)
            raise OptionsError(f"{shown(value)} is not a choice for {option.name!r}; choose one of: {allowed}.")
        choices[option.name] = choice
    gpus = _pick_gpus(profile, user_options.get("gpus"))
    stop_at, run_hours = _pick_stop_at(user_options, now, max_run_hours)
    gpu_type, max_price = _pick_runpod(profile, user_options) if profile.runpod else (None, None)
    return Selection(
        profile=profile,
        choices=choices,
        gpus=gpus,
        stop_at=stop_at,
        run_hours=run_hours,
        gpu_type=gpu_type,
        max_price_per_hour=max_price,
    )
