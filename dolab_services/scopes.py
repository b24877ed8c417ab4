"""DO-LAB's own hub scopes: what a token may do in the services to servers, usage and backups that are not its
owner's.

The services decide from the request's scopes, never from the hub's ``admin`` flag: a token an admin limited to
``access:services!service=dolab-culler`` opens the culler's page as that admin, but stops nobody's server. Acting on
one's own servers, usage and backups needs only ``access:services!service=<the service>`` (and the identity the hub
vouches for); acting for another user needs one of these:

- :data:`STOP_SERVERS`: stop any user's server through the culler's stop path (its pre-stop backup first);
- :data:`EXTEND_SERVERS`: move another user's stop time later, or keep their idle server running;
- :data:`READ_USAGE`: read another user's GPU use, spend and quota; unfiltered, every GPU and server (the overview);
- :data:`MANAGE_BACKUPS`: list, back up, restore and choose the target of another user's workspace backups.

Each may be filtered like the hub's own scopes: ``custom:dolab:stop-servers!user=bob`` (or ``!server=bob/``) lets
a role stop bob's servers only. ``!group=`` filters are not resolved by the services (they would need the hub's
database), so such a grant allows nothing there.

The shipped config defines them (:func:`with_custom_scopes`), gives all four to the configured admins through the
``dolab-admin`` role (:func:`with_admin_role`), and each service lists the ones it checks in its
``oauth_client_allowed_scopes``, so the token the hub issues when an admin opens its page in a browser carries them.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ADMIN_ROLE",
    "CUSTOM_SCOPES",
    "EXTEND_SERVERS",
    "MANAGE_BACKUPS",
    "READ_USAGE",
    "STOP_SERVERS",
    "with_admin_role",
    "with_custom_scopes",
]

STOP_SERVERS = "custom:dolab:stop-servers"
EXTEND_SERVERS = "custom:dolab:extend-servers"
READ_USAGE = "custom:dolab:read-usage"
MANAGE_BACKUPS = "custom:dolab:manage-backups"
#: The role the shipped config gives DO-LAB's scopes to (JupyterHub's own ``admin`` role cannot be changed).
ADMIN_ROLE = "dolab-admin"

#: ``c.JupyterHub.custom_scopes``: each scope with the description the hub shows on its token and OAuth pages.
CUSTOM_SCOPES: dict[str, dict[str, str]] = {
    STOP_SERVERS: {"description": "Stop other users' servers through DO-LAB's culler (after their final backup)."},
    EXTEND_SERVERS: {
        "description": "Extend the stop time of other users' servers, or keep their idle servers running (DO-LAB)."
    },
    READ_USAGE: {"description": "Read other users' GPU use, spend and quotas in DO-LAB's monitor."},
    MANAGE_BACKUPS: {"description": "List, make and restore other users' workspace backups in DO-LAB's sync."},
}


def with_custom_scopes(config: Any) -> dict[str, dict[str, Any]]:
    """``c.JupyterHub.custom_scopes`` with DO-LAB's added to those the config defines so far."""
    from dolab_core.hubconfig import config_value

    return {**CUSTOM_SCOPES, **(config_value(config, "JupyterHub", "custom_scopes", {}) or {})}


def _in_any_section(config: Any, key: str) -> list[Any]:
    """``key``'s value in every section of ``config`` that sets it (``admin_groups`` lives on the provider's class)."""
    from dolab_core.hubconfig import config_value

    return [config_value(config, section, key) for section in list(config) if key in (config[section] or {})]


def with_admin_role(config: Any) -> list[dict[str, Any]]:
    """``c.JupyterHub.load_roles`` with the :data:`ADMIN_ROLE` role: DO-LAB's scopes for the configured admins.

    JupyterHub refuses any change to its own ``admin`` role, so DO-LAB's scopes go to a role of their own, held by
    ``c.Authenticator.admin_users`` and the members of every ``admin_groups`` the config names (an identity
    provider's admin group, kept in sync at each login). The hub applies the list at each start, adding and
    revoking. An admin made in the admin page, or by an identity provider's claim, has the hub's powers but not these
    until named there. An overlay's own ``dolab-admin`` entry is extended, not duplicated; with an authenticator
    that manages roles (``manage_roles``), no one is named: its roles must grant the scopes.
    """
    from dolab_core.hubconfig import config_value

    roles = [dict(role) for role in config_value(config, "JupyterHub", "load_roles", []) or ()]
    managed = any(bool(value) for value in _in_any_section(config, "manage_roles"))
    users = set() if managed else set(config_value(config, "Authenticator", "admin_users", set()) or ())
    groups = set() if managed else {g for found in _in_any_section(config, "admin_groups") for g in found or ()}
    role = next((r for r in roles if r.get("name") == ADMIN_ROLE), None)
    if role is None:
        role = {"name": ADMIN_ROLE, "description": "DO-LAB's powers over other users' servers, usage and backups"}
        roles.append(role)
    role["scopes"] = [*role.get("scopes", ()), *(s for s in CUSTOM_SCOPES if s not in role.get("scopes", ()))]
    if users or "users" in role:
        role["users"] = sorted({*role.get("users", ()), *users})
    if groups or "groups" in role:
        role["groups"] = sorted({*role.get("groups", ()), *groups})
    return roles
