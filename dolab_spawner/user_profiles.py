"""Which profiles a user may start: the configured ones (``profile_list``, or one per GPU model found), filtered
by the plan of the user's groups, and the latest stop time that plan allows. A DoLabSpawner mixin.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from jupyterhub.spawner import Spawner, SpawnException
from jupyterhub.utils import maybe_future
from traitlets import HasTraits, TraitError, validate

from dolab_core.gpus import GpuSlot
from dolab_core.plans import Plan, PlanConfigError, PlanTable, parse_plans

from .backends import BACKENDS, backend_class
from .profiles import Profile, ProfileConfigError, default_profiles, parse_profile_list

__all__ = ["UserProfiles"]

if TYPE_CHECKING:
    _Base = Spawner
else:
    _Base = object


class _OverrideKeys(Mapping[str, set[str]]):
    """Per backend name, the traits a profile's ``spawner_override`` may set: the spawner's and its backend's config
    traits. A backend is imported only when a profile names it."""

    def __init__(self, spawner_cls: type[HasTraits]) -> None:
        self._own = set(spawner_cls.class_trait_names(config=True))

    def __getitem__(self, name: str) -> set[str]:
        if name not in BACKENDS:
            raise KeyError(name)
        return self._own | set(backend_class(name).class_trait_names(config=True))

    def __iter__(self) -> Iterator[str]:
        return iter(BACKENDS)

    def __len__(self) -> int:
        return len(BACKENDS)


class UserProfiles(_Base):  # type: ignore[valid-type,misc]
    """DoLabSpawner's profiles and plans: what :meth:`get_profiles` offers this user and :meth:`check_plan` refuses."""

    if TYPE_CHECKING:
        profile_list: Any
        plans: dict[str, Any]
        max_run_hours: float

        async def ensure_inventory(self) -> list[GpuSlot]: ...

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

    @classmethod
    def override_keys(cls) -> Mapping[str, set[str]]:
        """Per backend, the trait names a profile's ``spawner_override`` may set (imports a backend when asked)."""
        return _OverrideKeys(cls)

    @classmethod
    def _parse_profiles(cls, raw: Any) -> list[Profile]:
        return parse_profile_list(raw, backends=list(BACKENDS), allowed_overrides=cls.override_keys())

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
