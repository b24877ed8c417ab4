"""The provider classes: any OpenID Connect provider, and thin variants where Google's and GitHub's APIs differ.

- :class:`DoLabAuthenticator` (entry point ``dolab``): any OpenID Connect provider (Keycloak, Azure AD, Auth0,
  Okta, Authentik, Google as plain OIDC...). Set ``issuer``; the endpoints come from its
  ``/.well-known/openid-configuration`` at the first login (an async request: the hub's loop never blocks).
- :class:`DoLabGoogleAuthenticator` (``dolab-google``): Google, whose groups come from the Admin SDK (oauthenticator's
  ``allowed_google_groups`` machinery) and whose offline access is asked with ``access_type=offline``; with
  ``drive_backup`` the login also asks for the ``drive.file`` scope for workspace backup to Google Drive.
  ``hosted_domain`` admits the members of those Workspace domains (and only them).
- :class:`DoLabGitHubAuthenticator` (``dolab-github``): GitHub, whose "groups" are the user's teams, named
  ``org:team``; ``allowed_organizations`` admits members of organisations or teams.

Each names the settings that say who may log in (``allow_settings``); without one of them, or an explicit
``allow_all``, the hub refuses to start (:meth:`DoLabOAuthenticator.check_allow_config`).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from oauthenticator.generic import GenericOAuthenticator
from oauthenticator.github import GitHubOAuthenticator
from oauthenticator.google import GoogleOAuthenticator
from traitlets import Bool, Unicode, default

from .base import _PROVIDER_FAILURES, DoLabOAuthenticator, _describe
from .errors import ProviderError, provider_error

__all__ = ["DRIVE_SCOPE", "DoLabAuthenticator", "DoLabGitHubAuthenticator", "DoLabGoogleAuthenticator"]

#: The one Drive scope DO-LAB asks for: files this app created or opened, nothing else of the user's Drive.
DRIVE_SCOPE = "https://www.googleapis.com/auth/drive.file"


class DoLabAuthenticator(DoLabOAuthenticator, GenericOAuthenticator):
    """Log in with any OpenID Connect provider; its groups claim becomes JupyterHub groups (and so plans)."""

    issuer = Unicode(
        "",
        config=True,
        help="""The provider's issuer URL (e.g. ``https://login.example.org/realms/lab``). The authorize, token
        and userinfo URLs are read from ``<issuer>/.well-known/openid-configuration`` at the first login, unless
        ``authorize_url``, ``token_url`` and ``userdata_url`` are all set.
        """,
    )

    _DISCOVERED: ClassVar[tuple[str, ...]] = ("authorize_url", "token_url", "userdata_url")

    @default("login_service")
    def _default_login_service(self) -> str:
        return "your organization's account"

    @default("username_claim")
    def _default_username_claim(self) -> Any:
        return "preferred_username"

    @default("scope")
    def _default_scope(self) -> list[str]:
        return ["openid", "profile", "email", "offline_access"]

    @property
    def provider_name(self) -> str:
        """The provider, for sentences users read."""
        where = self.issuer or self.authorize_url
        return f"The identity provider at {where}" if where else "The identity provider"

    @property
    def accounts_at(self) -> str:
        """Where the accounts this login accepts live, for sentences admins read."""
        where = self.issuer or self.authorize_url
        return f"the identity provider at {where}" if where else "the identity provider"

    _discovery_lock: asyncio.Lock | None = None

    async def ensure_discovered(self) -> None:
        """Read the endpoints from the issuer's OpenID configuration once; errors are sentences (502/503)."""
        if not self.issuer or all(getattr(self, name) for name in self._DISCOVERED):
            return
        if self._discovery_lock is None:
            self._discovery_lock = asyncio.Lock()
        async with self._discovery_lock:
            if all(getattr(self, name) for name in self._DISCOVERED):
                return
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            what = "reading its OpenID configuration"
            try:
                doc = await self.httpfetch(
                    url, "fetching the OpenID configuration", headers={"Accept": "application/json"}
                )
                endpoints = _endpoints(doc, self.issuer)
            except _PROVIDER_FAILURES as e:
                self.log.error("OpenID discovery at %s failed: %s", url, _describe(e))
                raise provider_error(self.provider_name, what, e) from None
            except ProviderError:
                raise
            for name, value in endpoints.items():
                if not getattr(self, name):
                    setattr(self, name, value)
            self.log.info("OpenID discovery at %s: %s", url, ", ".join(f"{k}={v}" for k, v in endpoints.items()))


def _endpoints(doc: Any, issuer: str) -> dict[str, str]:
    """The endpoints of an OpenID configuration document; ValueError when it is not one for ``issuer``."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if str(doc.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
        raise ValueError(f"issuer {doc.get('issuer')!r} is not {issuer!r}")
    found = {
        "authorize_url": doc.get("authorization_endpoint"),
        "token_url": doc.get("token_endpoint"),
        "userdata_url": doc.get("userinfo_endpoint"),
    }
    for name, value in found.items():
        if not isinstance(value, str) or not value.startswith(("https://", "http://")):
            raise ValueError(f"no usable {name}")
    return found  # type: ignore[return-value]


class DoLabGoogleAuthenticator(DoLabOAuthenticator, GoogleOAuthenticator):
    """Log in with Google; with ``drive_backup``, keep a Drive token (``drive.file``) for workspace backup."""

    auth_name: ClassVar[str] = "google"
    allow_settings: ClassVar[tuple[tuple[str, str], ...]] = (
        ("DOLAB_ALLOWED_DOMAINS", "hosted_domain"),
        ("DOLAB_ALLOWED_USERS", "allowed_users"),
        ("", "allowed_google_groups"),
    )

    drive_backup = Bool(
        False,
        config=True,
        help="""Ask at login for Google Drive access limited to the files DO-LAB creates (the ``drive.file`` scope),
        with offline access (``access_type=offline``, ``prompt=consent``), so the sync service can back
        workspaces up to the user's Drive. The tokens stay in the encrypted auth_state.
        """,
    )

    @default("groups_claim")
    def _default_groups_claim(self) -> str:
        # Filled by GoogleOAuthenticator from the Admin SDK when allowed_google_groups/admin_google_groups are set.
        return "google_groups"

    @property
    def provider_name(self) -> str:
        """The provider, for sentences users read."""
        return "Google"

    @property
    def accounts_at(self) -> str:
        """Where the accounts this login accepts live, for sentences admins read."""
        return "Google"

    def allow_rules(self) -> list[str]:
        """The settings in effect that name who may log in, with Google's domains and groups."""
        extra = [name for name in ("hosted_domain", "allowed_google_groups") if getattr(self, name)]
        return [*super().allow_rules(), *extra]

    async def check_allowed(self, username: str, auth_model: Any) -> bool:
        """oauthenticator's rules, and: a ``hosted_domain`` admits the members of those Workspace domains.

        (oauthenticator's own ``hosted_domain`` only turns everyone else away, in ``check_blocked_users``, and
        admits no one by itself.)
        """
        if await super().check_allowed(username, auth_model):
            return True
        if auth_model is None or not self.hosted_domain:
            return False
        user_info = auth_model["auth_state"].get(self.user_auth_state_key) or {}
        return user_info.get("hd") in self.hosted_domain

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.drive_backup:
            if DRIVE_SCOPE not in self.scope:
                self.scope = [*self.scope, DRIVE_SCOPE]
            # Google returns a refresh token only with offline access, and again only when consent is asked.
            self.extra_authorize_params = {**self.extra_authorize_params, "access_type": "offline", "prompt": "consent"}


class DoLabGitHubAuthenticator(DoLabOAuthenticator, GitHubOAuthenticator):
    """Log in with GitHub; the user's teams become JupyterHub groups named ``org:team``."""

    auth_name: ClassVar[str] = "github"
    allow_settings: ClassVar[tuple[tuple[str, str], ...]] = (
        ("DOLAB_ALLOWED_ORGS", "allowed_organizations"),
        ("DOLAB_ALLOWED_USERS", "allowed_users"),
    )

    @default("scope")
    def _default_scope(self) -> list[str]:
        return ["read:user", "read:org"]

    @default("populate_teams_in_auth_state")
    def _default_populate_teams(self) -> bool:
        return True

    @default("auth_state_groups_key")
    def _default_auth_state_groups_key(self) -> Any:
        return github_team_groups

    @property
    def provider_name(self) -> str:
        """The provider, for sentences users read."""
        return "GitHub"

    @property
    def accounts_at(self) -> str:
        """Where the accounts this login accepts live, for sentences admins read."""
        return "GitHub" if self.github_url == "https://github.com" else f"GitHub at {self.github_url}"

    def allow_rules(self) -> list[str]:
        """The settings in effect that name who may log in, with GitHub's organisations and teams."""
        return [*super().allow_rules(), *(["allowed_organizations"] if self.allowed_organizations else [])]


def github_team_groups(auth_state: dict[str, Any]) -> list[str]:
    """GitHub teams (``auth_state["teams"]``) as group names ``org:team-slug``."""
    groups = []
    for team in auth_state.get("teams") or []:
        org = (team.get("organization") or {}).get("login")
        if org and team.get("slug"):
            groups.append(f"{org}:{team['slug']}")
    return groups
