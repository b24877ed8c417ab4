"""DoLabSpawner's options form: rendered from the user's profiles with live GPU availability and prices, and
parsed back into ``user_options``, checked so that errors show on the form itself.

The hub calls ``DoLabSpawner.render_options_form``/``options_from_form``, which call these with the spawner; the
form reads only its public methods (profiles, plan, slots, backend hosts) and the backends' ``form_prices``.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from jupyterhub.spawner import SpawnException

from dolab_core.times import format_time

from .backends import backend_class
from .options import OptionsError, resolve_options
from .profiles import Profile

if TYPE_CHECKING:
    from .spawner import DoLabSpawner

__all__ = ["form_time_to_utc", "options_from_form", "render_options_form"]

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


async def _card(spawner: DoLabSpawner, profile: Profile, selected: str) -> dict[str, Any]:
    """One profile's card: its GPUs free and in all on the machines of its backend, and its prices if it has some."""
    free = total = 0
    if profile.gpus:
        hosts = spawner.backend_hosts(profile.backend)
        free, total = spawner.allocator.availability(profile.gpu_type, profile.gpu_exact, hosts)
    card: dict[str, Any] = {"profile": profile, "free": free, "total": total, "selected": profile.slug == selected}
    prices = await backend_class(profile.backend).form_prices(spawner, profile)
    if prices is not None:
        card["prices"] = prices
    return card


async def render_options_form(spawner: DoLabSpawner) -> str:
    """The form: one card per profile with live GPU availability, its options, and a stop time."""
    profiles = await spawner.get_profiles()
    await spawner.ensure_inventory()
    previous = spawner.user_options or {}
    selected = previous.get("profile") if previous.get("profile") in {p.slug for p in profiles} else None
    if selected is None:
        selected = next((p.slug for p in profiles if p.default), profiles[0].slug)
    max_run_hours = spawner.user_max_run_hours()
    cards = [await _card(spawner, profile, selected) for profile in profiles]
    now = datetime.now(timezone.utc)
    return _TEMPLATES.get_template("options_form.html").render(
        cards=cards,
        max_run_hours=max_run_hours,
        previous=previous,
        now_utc=now.strftime("%Y-%m-%dT%H:%M"),
        latest_utc=(now + timedelta(hours=max_run_hours)).strftime("%Y-%m-%dT%H:%M") if max_run_hours > 0 else "",
    )


async def options_from_form(spawner: DoLabSpawner, formdata: dict[str, list[str]]) -> dict[str, Any]:
    """Turn the posted form into user_options, and check them so errors show on the form itself (ValueError)."""

    def first(key: str) -> str:
        return (formdata.get(key) or [""])[0].strip()

    profiles = await spawner.get_profiles()
    slug = first("profile")
    options: dict[str, Any] = {"profile": slug}
    chosen = next((p for p in profiles if p.slug == slug), None)
    for option in chosen.options if chosen else ():
        value = first(f"profile-option-{slug}--{option.name}")
        if value:
            options[option.name] = value
    if first(f"gpus-{slug}"):
        options["gpus"] = first(f"gpus-{slug}")
    if first(f"gpu_type-{slug}"):
        options["gpu_type"] = first(f"gpu_type-{slug}")
    mode = first("stop_mode")
    if mode == "hours":
        options["run_hours"] = first("run_hours")
    elif mode == "at" and first("stop_at"):
        options["stop_at"] = form_time_to_utc(first("stop_at"), first("tz_offset_minutes"))
    try:
        await spawner.check_plan(options)
    except SpawnException as e:
        raise ValueError(e.message) from None
    try:
        selection = resolve_options(profiles, options, max_run_hours=spawner.user_max_run_hours())
    except OptionsError as e:
        raise ValueError(str(e)) from None
    return selection.user_options()


def form_time_to_utc(local: str, offset_minutes: str) -> str:
    """A ``datetime-local`` value plus the browser's ``getTimezoneOffset()`` -> ISO UTC (UTC without JS)."""
    try:
        when = datetime.fromisoformat(local)
    except ValueError:
        return local  # resolve_options says what is wrong with it
    if when.tzinfo is None:
        try:
            offset = int(offset_minutes) if offset_minutes and len(offset_minutes) <= 6 else 0
        except ValueError:
            offset = 0
        if abs(offset) > 24 * 60:  # no time zone is a day away from UTC: not what a browser sends
            offset = 0
        try:
            when = when.replace(tzinfo=timezone.utc) + timedelta(minutes=offset)
        except OverflowError:
            raise ValueError("That stop time is out of range: pick a time in the next few days.") from None
    return format_time(when)
