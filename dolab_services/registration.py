"""What ``jupyterhub_config.py`` adds for one hub-managed service: one :class:`Registration` type for them all.

Each service's ``registration.py`` builds one from the hub's config and environment (``culler_service``,
``monitor_service``, ``sync_service``, ``reaper_service``, ``runpod_reaper_service``); the shipped config adds it
with :meth:`Registration.add_to`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from traitlets.config import Config

from dolab_core.hubconfig import config_value

__all__ = ["Registration", "registered"]


def registered(config: Config, name: str) -> bool:
    """Whether the config already has a service ``name`` (an admin's own, kept as it is)."""
    services = config_value(config, "JupyterHub", "services", [])
    return any(isinstance(s, Mapping) and s.get("name") == name for s in services)


@dataclass(frozen=True)
class Registration:
    """A managed service as the hub config adds it: the service, its least-privilege role, the scopes every user
    gets for it, and what it sets on the spawner."""

    #: ``c.JupyterHub.services`` entry (name, command, url, environment, ...).
    service: dict[str, Any]
    #: ``c.JupyterHub.load_roles`` entry: the service's own scopes.
    role: dict[str, Any]
    #: ``c.JupyterHub.extra_user_scopes`` after adding this service's (those the config had, plus its own).
    extra_user_scopes: set[str] = field(default_factory=set)
    #: ``DoLabSpawner`` settings the service brings, by trait name (its spawn-time checks and hooks).
    spawner_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The service's name in the hub."""
        return str(self.service["name"])

    def add_to(self, c: Config) -> None:
        """Add the service and its role to ``c``, the user scopes, and the spawner settings the config does not
        set already."""
        c.JupyterHub.services = [*config_value(c, "JupyterHub", "services", []), self.service]
        c.JupyterHub.load_roles = [*config_value(c, "JupyterHub", "load_roles", []), self.role]
        if self.extra_user_scopes:
            c.JupyterHub.extra_user_scopes = set(self.extra_user_scopes)
        for trait, value in self.spawner_settings.items():
            if trait not in c.DoLabSpawner:
                setattr(c.DoLabSpawner, trait, value)
