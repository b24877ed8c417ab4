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

The shipped config defines them (:func:`with_custom_scopes`), gives all four to the hub's
``admin`` role (:func:`with_admin_scopes`), and each service lists the ones it checks in its
``oauth_client_allowed_scopes``, so the token the hub issues when an admin opens its page in a browser carries them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "CUSTOM_SCOPES",
    "EXTEND_SERVERS",
    "MANAGE_BACKUPS",
    "READ_USAGE",
    "STOP_SERVERS",
    "admin_scopes",
    "with_admin_scopes",
    "with_custom_scopes",
]

STOP_SERVERS = "custom:dolab:stop-servers"
EXTEND_SERVERS = "custom:dolab:extend-servers"
READ_USAGE = "custom:dolab:read-usage"
MANAGE_BACKUPS = "custom:dolab:manage-backups"

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
    from dolab_spawner.hubconfig import config_value

    return {**CUSTOM_SCOPES, **(config_value(config, "JupyterHub", "custom_scopes", {}) or {})}


def admin_scopes() -> list[str]:
    """The hub's default ``admin`` role's scopes (JupyterHub's own list) plus DO-LAB's."""
    from jupyterhub.roles import get_default_roles

    default = next(r for r in get_default_roles() if r["name"] == "admin")
    return [*default["scopes"], *(s for s in CUSTOM_SCOPES if s not in default["scopes"])]


def with_admin_scopes(load_roles: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``c.JupyterHub.load_roles`` with DO-LAB's scopes added to the ``admin`` role.

    The hub merges a role named ``admin`` with its default one, but a ``scopes`` key replaces the default list, so
    the entry carries JupyterHub's admin scopes too. An ``admin`` entry an overlay already wrote keeps its own
    scopes (an admin who narrowed the role meant it) and gets DO-LAB's added; the hub refuses two of one name.
    """
    roles = [dict(role) for role in load_roles]
    for role in roles:
        if role.get("name") == "admin":
            if "scopes" in role:
                role["scopes"] = [*role["scopes"], *(s for s in CUSTOM_SCOPES if s not in role["scopes"])]
            else:
                role["scopes"] = admin_scopes()
            return roles
    return [*roles, {"name": "admin", "scopes": admin_scopes()}]
