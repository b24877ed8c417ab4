"""A user's options: the untrusted ``user_options`` (the form's or any JSON the REST API takes) checked against the
profiles, into a :class:`Selection`, the only thing the spawner and its backends act on.

Everything here is pure; the spawner turns :class:`OptionsError` into an HTTP 400. Every number is compared before
it is converted (a 400-digit int has no float), text is read as a number or time only up to :data:`MAX_TEXT_CHARS`,
a stop time is at most :data:`MAX_RUN_HOURS_EVER` ahead even without a maximum, and a refusal quotes at most a
short piece of what was sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from dolab_core.text import shown
from dolab_core.times import format_time

from .profiles import Choice, Profile

__all__ = [
    "MAX_OPTION_KEYS",
    "MAX_RUN_HOURS_EVER",
    "MAX_TEXT_CHARS",
    "OptionsError",
    "Selection",
    "parse_stop_at",
    "resolve_options",
]

#: The longest text read as a number, a time or a GPU count; a longer one is refused unread.
MAX_TEXT_CHARS = 64
#: The most keys a user_options object may have (a profile takes the reserved keys plus its options).
MAX_OPTION_KEYS = 64
#: How far ahead a stop time may be even when no maximum is set (about 11 years): bounds every hour count sent.
MAX_RUN_HOURS_EVER = 100_000


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
