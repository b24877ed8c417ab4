"""Switch the shipped config from the shared password to an identity provider with environment variables only.

``configure_login(c, env, bind_url)`` is called by ``jupyterhub_config.py``; each variable maps to one trait:

| variable | trait |
| --- | --- |
| ``DOLAB_AUTH`` | ``shared-password`` (default), ``oidc``, ``google`` or ``github`` |
| ``DOLAB_OIDC_ISSUER`` | ``DoLabAuthenticator.issuer`` (``oidc``: required) |
| ``DOLAB_OIDC_CLIENT_ID`` / ``DOLAB_OIDC_CLIENT_SECRET`` | ``client_id`` / ``client_secret`` (required) |
| ``DOLAB_OIDC_SCOPES`` | ``scope`` (space or comma separated) |
| ``DOLAB_OIDC_USERNAME_CLAIM`` / ``DOLAB_OIDC_GROUPS_CLAIM`` | ``username_claim`` / ``groups_claim`` |
| ``DOLAB_OIDC_CALLBACK_URL`` | ``oauth_callback_url`` (default ``$DOLAB_BIND_URL/hub/oauth_callback``) |
| ``DOLAB_ADMIN_GROUP`` / ``DOLAB_ADMIN_CLAIM`` | ``admin_groups`` (comma separated) / ``admin_claim`` |
| ``DOLAB_ALLOWED_GROUPS`` | ``allowed_groups`` (comma separated): members of these groups may log in |
| ``DOLAB_ALLOWED_USERS`` | ``allowed_users`` (comma separated) |
| ``DOLAB_ALLOWED_DOMAINS`` | ``DoLabGoogleAuthenticator.hosted_domain`` (``google`` only): Workspace domains |
| ``DOLAB_ALLOWED_ORGS`` | ``DoLabGitHubAuthenticator.allowed_organizations`` (``github`` only): ``org``, ``org:team`` |
| ``DOLAB_AUTH_ALLOW_ALL`` | ``allow_all``: ``1`` lets in everyone with an account at the provider |
| ``DOLAB_DRIVE_BACKUP`` | ``DoLabGoogleAuthenticator.drive_backup`` (``google`` only) |
| ``DOLAB_ADMIN_USERS`` | ``admin_users`` (with a provider: none unless set) |

Nobody named and no ``DOLAB_AUTH_ALLOW_ALL=1``: the hub refuses to start (overlays may still name people:
the check runs when the hub starts, see ``DoLabOAuthenticator.check_allow_config``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from dolab_core.hubconfig import ConfigEnvError, env_list

from .providers import DoLabAuthenticator, DoLabGitHubAuthenticator, DoLabGoogleAuthenticator

__all__ = ["PROVIDERS", "check_crypt_key", "configure_login"]

#: DOLAB_AUTH values and the class each selects.
PROVIDERS: dict[str, type] = {
    "oidc": DoLabAuthenticator,
    "google": DoLabGoogleAuthenticator,
    "github": DoLabGitHubAuthenticator,
}


def check_crypt_key(env: Mapping[str, str]) -> None:
    """Refuse to start without ``JUPYTERHUB_CRYPT_KEY``: login tokens are kept only in encrypted auth_state."""
    keys = [k.strip() for k in env.get("JUPYTERHUB_CRYPT_KEY", "").split(";") if k.strip()]
    if not keys:
        raise ConfigEnvError(
            "a login provider keeps each user's tokens in encrypted auth_state, so JUPYTERHUB_CRYPT_KEY must be set: "
            "generate one with `openssl rand -hex 32`, put it in the hub's environment, and keep it (changing it "
            "makes every stored login unreadable, and users must log in again)."
        )
    for key in keys:
        if not (re.fullmatch(r"[0-9a-fA-F]{64}", key) or re.fullmatch(r"[A-Za-z0-9+/_-]{43}=?", key)):
            raise ConfigEnvError(
                "JUPYTERHUB_CRYPT_KEY must be 32 bytes, hex (64 characters) or base64 (44 characters); "
                "generate one with `openssl rand -hex 32`."
            )


def configure_login(c: Any, env: Mapping[str, str], bind_url: str) -> str | None:
    """Apply ``DOLAB_AUTH`` and its variables to the config ``c``; returns the provider name, None for the default.

    Raises :class:`ConfigEnvError` with a sentence saying which variable is missing or wrong.
    """
    mode = env.get("DOLAB_AUTH", "shared-password").strip().lower() or "shared-password"
    if mode == "shared-password":
        return None
    if mode not in PROVIDERS:
        raise ConfigEnvError(f"DOLAB_AUTH={mode!r} is not known; use shared-password, {', '.join(PROVIDERS)}")
    cls = PROVIDERS[mode]
    section = getattr(c, cls.__name__)
    check_crypt_key(env)
    missing = [name for name in ("DOLAB_OIDC_CLIENT_ID", "DOLAB_OIDC_CLIENT_SECRET") if not env.get(name)]
    if mode == "oidc" and not env.get("DOLAB_OIDC_ISSUER"):
        missing.insert(0, "DOLAB_OIDC_ISSUER")
    if missing:
        raise ConfigEnvError(f"DOLAB_AUTH={mode} needs {', '.join(missing)} (see README.md, 'Logging in')")

    c.JupyterHub.authenticator_class = cls
    section.client_id = env["DOLAB_OIDC_CLIENT_ID"]
    section.client_secret = env["DOLAB_OIDC_CLIENT_SECRET"]
    section.oauth_callback_url = env.get("DOLAB_OIDC_CALLBACK_URL") or bind_url.rstrip("/") + "/hub/oauth_callback"
    if mode == "oidc":
        section.issuer = env["DOLAB_OIDC_ISSUER"]
    if env.get("DOLAB_OIDC_SCOPES"):
        section.scope = [s for s in re.split(r"[\s,]+", env["DOLAB_OIDC_SCOPES"]) if s]
    if env.get("DOLAB_OIDC_USERNAME_CLAIM"):
        section.username_claim = env["DOLAB_OIDC_USERNAME_CLAIM"]
    if env.get("DOLAB_OIDC_GROUPS_CLAIM"):
        section.groups_claim = env["DOLAB_OIDC_GROUPS_CLAIM"]
    if env.get("DOLAB_LOGIN_SERVICE"):
        section.login_service = env["DOLAB_LOGIN_SERVICE"]
    admin_groups = env_list(env, "DOLAB_ADMIN_GROUP")
    if admin_groups:
        section.admin_groups = set(admin_groups)
    if env.get("DOLAB_ADMIN_CLAIM"):
        section.admin_claim = env["DOLAB_ADMIN_CLAIM"]
    _configure_allowed(section, env, mode)
    # A provider user called "admin" must not become an admin because the password login's default says so.
    c.Authenticator.admin_users = set(env_list(env, "DOLAB_ADMIN_USERS"))
    drive = _flag(env, "DOLAB_DRIVE_BACKUP")
    if drive:
        if mode != "google":
            raise ConfigEnvError("DOLAB_DRIVE_BACKUP needs DOLAB_AUTH=google: Drive tokens come with a Google login")
        section.drive_backup = True
    return mode


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _configure_allowed(section: Any, env: Mapping[str, str], mode: str) -> None:
    """Who may log in. Everyone with an account at the provider only when DOLAB_AUTH_ALLOW_ALL says so."""
    # Set even when false: the shipped config's `c.Authenticator.allow_all = True` (shared password) would
    # otherwise reach the provider's class through config inheritance.
    section.allow_all = _flag(env, "DOLAB_AUTH_ALLOW_ALL")
    if groups := env_list(env, "DOLAB_ALLOWED_GROUPS"):
        section.allowed_groups = set(groups)
    if users := env_list(env, "DOLAB_ALLOWED_USERS"):
        section.allowed_users = set(users)
    if domains := env_list(env, "DOLAB_ALLOWED_DOMAINS"):
        if mode != "google":
            raise ConfigEnvError("DOLAB_ALLOWED_DOMAINS needs DOLAB_AUTH=google (Google Workspace domains)")
        section.hosted_domain = [d.lower() for d in domains]
    if orgs := env_list(env, "DOLAB_ALLOWED_ORGS"):
        if mode != "github":
            raise ConfigEnvError("DOLAB_ALLOWED_ORGS needs DOLAB_AUTH=github (GitHub organisations or org:team)")
        section.allowed_organizations = set(orgs)
