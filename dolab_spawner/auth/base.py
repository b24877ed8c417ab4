"""What every DO-LAB login has, whatever the provider: groups, admins, tokens kept fresh, failures as sentences.

:class:`DoLabOAuthenticator` sits between oauthenticator's ``OAuthenticator`` and a provider class
(``GenericOAuthenticator``, ``GoogleOAuthenticator``, ``GitHubOAuthenticator``). Extension points, in the order a
login uses them: :meth:`ensure_discovered` (OpenID discovery, generic only), the provider's token exchange
(:meth:`get_token_info` adds ``expires_at``), :meth:`build_auth_state_dict`, :meth:`update_auth_model` (admin
claim), then oauthenticator's managed groups (``groups_claim`` -> JupyterHub groups, ``admin_groups``).

Tokens live only in the encrypted ``auth_state``. :meth:`refresh_user` renews an access token with its refresh
token before it expires (``token_refresh_margin_seconds``); it runs when the hub refreshes a user's auth
(``auth_refresh_age``, before a spawn) and from a background loop (``token_refresh_interval_seconds``), so a
service reading auth_state finds a valid token even for a user who has not been seen for days.

Who may log in is said, never assumed: at start-up (:meth:`check_allow_config`) a provider with no allow rule
(allowed groups, users, organisations, domains) and no explicit ``allow_all`` stops the hub with a sentence. Every
refresh checks the rules again with the provider's fresh answer; a user they no longer allow (removed from the
team at the provider) is shut out at once (:meth:`shut_out`): logged out of every browser, her tokens deleted (so
her servers, which ask the hub who is knocking, turn her away), and a new login is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
import time
from typing import Any, ClassVar

from jupyterhub import orm, roles
from jupyterhub.utils import new_token
from oauthenticator.oauth2 import OAuthenticator, OAuthLoginHandler
from tornado import web
from tornado.httpclient import HTTPClientError
from traitlets import Float, Unicode, default

from .errors import ProviderError, provider_error

__all__ = ["DoLabLoginHandler", "DoLabOAuthenticator"]

# Failures of a request to the provider that are the provider's fault (down, slow, garbage), not the user's.
_PROVIDER_FAILURES = (HTTPClientError, OSError, TimeoutError, ValueError, TypeError, KeyError, AttributeError)


class DoLabLoginHandler(OAuthLoginHandler):
    """The redirect to the provider, after the provider's endpoints are known (OpenID discovery)."""

    async def get(self) -> None:
        await self.authenticator.ensure_discovered()
        super().get()


class DoLabOAuthenticator(OAuthenticator):
    """Groups, admins, token refresh and clear failures on top of an oauthenticator provider class."""

    login_handler = DoLabLoginHandler

    #: The ``DOLAB_AUTH`` value that selects this class, for sentences admins read.
    auth_name: ClassVar[str] = "oidc"
    #: What an admin can set to say who may log in: (environment variable or "", trait), for the start-up sentence.
    allow_settings: ClassVar[tuple[tuple[str, str], ...]] = (
        ("DOLAB_ALLOWED_GROUPS", "allowed_groups"),
        ("DOLAB_ALLOWED_USERS", "allowed_users"),
    )

    groups_claim = Unicode(
        "groups",
        config=True,
        help="""The claim of the provider's user info that lists the user's groups, synced into JupyterHub groups
        at every login and refresh (``manage_groups``). Default ``groups`` (Keycloak, Auth0 and Azure AD can all
        send one; see the README).
        """,
    )

    admin_claim = Unicode(
        "",
        config=True,
        help="""A claim of the user info that, when true, makes the user a hub admin (e.g. ``dolab_admin``). Empty:
        admins come from ``admin_groups`` and ``admin_users`` only. With it set, a user whose claim is false
        loses admin rights at the next login unless ``admin_groups`` or ``admin_users`` names them.
        """,
    )

    token_refresh_margin_seconds = Float(
        300,
        config=True,
        help="""Renew an access token with its refresh token when it expires within this many seconds.""",
    )

    token_refresh_interval_seconds = Float(
        60,
        config=True,
        help="""How often the hub looks for access tokens about to expire and renews them, in seconds, so
        services reading auth_state (the Drive sync) always find a valid one. 0: only when the hub refreshes a
        user's auth on their own requests (``auth_refresh_age``) or before a spawn.
        """,
    )

    provider_timeout_seconds = Float(
        10,
        config=True,
        help="""Connect and request timeout, in seconds, of every request to the identity provider.""",
    )

    @default("manage_groups")
    def _default_manage_groups(self) -> bool:
        return True

    @default("enable_auth_state")
    def _default_enable_auth_state(self) -> bool:
        return True

    @default("auth_state_groups_key")
    def _default_auth_state_groups_key(self) -> Any:
        return f"{self.user_auth_state_key}.{self.groups_claim}"

    @default("http_request_kwargs")
    def _default_http_request_kwargs(self) -> dict[str, Any]:
        return {"connect_timeout": self.provider_timeout_seconds, "request_timeout": self.provider_timeout_seconds}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._refresh_locks: dict[str, asyncio.Lock] = {}
        self._expiry: dict[str, float] = {}
        self._refresher: asyncio.Task[None] | None = None
        from jupyterhub.app import JupyterHub  # the hub imports the authenticator while it starts

        if self.token_refresh_interval_seconds > 0 and isinstance(self.parent, JupyterHub):
            with contextlib.suppress(RuntimeError):  # no running loop: built outside the hub (tests, tools)
                self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    # ----- where the provider is ---------------------------------------------------------------------

    @property
    def provider_name(self) -> str:
        """The provider, for sentences users read."""
        return f"The identity provider ({self.login_service})"

    @property
    def accounts_at(self) -> str:
        """Where the accounts this login accepts live ("GitHub"), for sentences admins read."""
        return self.login_service

    async def ensure_discovered(self) -> None:
        """Make sure the provider's endpoints are known; generic OpenID Connect reads them from its issuer."""

    # ----- who may log in --------------------------------------------------------------------------------

    def allow_rules(self) -> list[str]:
        """The settings in effect that name who may log in (allow_all aside); empty: nobody is named."""
        names = ["allowed_users", "allowed_groups", "allowed_scopes", "allow_existing_users"]
        return [name for name in names if getattr(self, name)]

    def check_allow_config(self) -> None:
        """At hub start-up: refuse to run a login that lets in everyone with an account at the provider.

        Without any allow rule and without an explicit ``allow_all`` (``DOLAB_AUTH_ALLOW_ALL=1``), the hub exits
        with a sentence naming the settings to set. With ``allow_all`` and no rule, it says so in the log.
        """
        if self.allow_rules():
            return
        if self.allow_all:
            self.log.warning(
                "DO-LAB: anyone with an account at %s may log in (DOLAB_AUTH_ALLOW_ALL / allow_all)", self.accounts_at
            )
            return
        env_names = " or ".join(env for env, _ in self.allow_settings if env)
        traits = ", ".join(f"c.{type(self).__name__}.{trait}" for _, trait in self.allow_settings)
        sys.exit(
            f"DO-LAB: bad configuration: DOLAB_AUTH={self.auth_name} would let anyone with an account at "
            f"{self.accounts_at} log in. Say who may: set {env_names} (or {traits} in an overlay), or set "
            "DOLAB_AUTH_ALLOW_ALL=1 (c.Authenticator.allow_all = True) if every such account is welcome "
            "(README.md, 'Logging in')."
        )

    async def still_allowed(self, name: str, auth_model: dict[str, Any]) -> bool:
        """The allow rules (blocked users, allowed groups, users, organisations, domains, admins) applied again to
        a refreshed ``auth_model``, as at login. Provider failures raise (the caller keeps the current login)."""
        try:
            if not await _maybe_await(self.check_blocked_users(name, auth_model)):
                return False
            return bool(await _maybe_await(self.check_allowed(name, auth_model)))
        except ProviderError:
            raise
        except web.HTTPError as e:  # a provider class's own refusal (Google: unverified email)
            if e.status_code >= 500:
                raise ValueError("unusable answer while checking the allow rules") from None
            return False

    def shut_out(self, user: Any) -> None:
        """Log a user the allow rules no longer admit out of everything that goes through the hub.

        Her hub cookies stop working (a new cookie id), and every token of hers is deleted: those her browser holds
        for her servers (her servers ask the hub who a token belongs to, and now hear nobody), the ones she made,
        and her servers' own (which would reach her server through the proxy). Her servers keep running, so no
        work is lost, until an administrator or the culler stops them.
        """
        db = user.db
        orm_user = user.orm_user
        orm_user.cookie_id = new_token()
        for token in list(orm_user.api_tokens):
            db.delete(token)
        db.commit()
        running = sorted(name or "(default)" for name, spawner in user.spawners.items() if spawner.active)
        self.log.warning(
            "%s is no longer allowed to log in (%s's allow rules refuse the provider's current answer): logged out "
            "of the hub and of their servers%s",
            user.name,
            type(self).__name__,
            f"; their servers keep running until stopped: {', '.join(running)}" if running else "",
        )

    # ----- login ----------------------------------------------------------------------------------------

    async def authenticate(self, handler: Any, data: Any = None, **kwargs: Any) -> Any:
        """oauthenticator's login, with a provider that is down or answers garbage turned into a sentence."""
        await self.ensure_discovered()
        try:
            model = await super().authenticate(handler, data, **kwargs)
        except ProviderError:
            raise
        except web.HTTPError as e:
            if e.status_code < 500:
                raise
            # oauthenticator's 500s ("Bad response: {token_info}") may carry tokens: log the status only.
            self.log.error("Login failed: %s answered something unusable (%s)", self.provider_name, e.status_code)
            raise provider_error(self.provider_name, "signing you in", ValueError()) from None
        except _PROVIDER_FAILURES as e:
            self.log.error("Login failed: %s: %s", self.provider_name, _describe(e))
            raise provider_error(self.provider_name, "signing you in", e) from None
        if model:
            self._remember_expiry(model["name"], model.get("auth_state"))
        return model

    async def get_token_info(self, handler: Any, params: dict[str, Any]) -> dict[str, Any]:
        """The token endpoint's answer, plus ``expires_at`` (epoch seconds) when it says ``expires_in``."""
        info = await super().get_token_info(handler, params)
        if not isinstance(info, dict):
            raise ValueError("the token endpoint did not answer a JSON object")
        expires_in = info.get("expires_in")
        if isinstance(expires_in, (int, float, str)) and str(expires_in).replace(".", "", 1).isdigit():
            info["expires_at"] = time.time() + float(expires_in)
        return info

    def build_auth_state_dict(self, token_info: dict[str, Any], user_info: dict[str, Any]) -> dict[str, Any]:
        """oauthenticator's auth_state (tokens, token response, user info) plus ``expires_at``."""
        state = super().build_auth_state_dict(token_info, user_info)
        state["expires_at"] = token_info.get("expires_at")
        return state

    async def update_auth_model(self, auth_model: dict[str, Any]) -> dict[str, Any]:
        """The provider's own update, then admin status from ``admin_claim``."""
        auth_model = await super().update_auth_model(auth_model)
        if self.admin_claim and not auth_model.get("admin"):
            user_info = auth_model["auth_state"].get(self.user_auth_state_key) or {}
            auth_model["admin"] = user_info.get(self.admin_claim) is True
        return auth_model

    # ----- keeping tokens fresh ------------------------------------------------------------------------

    def _expires_soon(self, auth_state: dict[str, Any]) -> bool:
        expires_at = auth_state.get("expires_at")
        return isinstance(expires_at, (int, float)) and expires_at - time.time() < self.token_refresh_margin_seconds

    def _remember_expiry(self, name: str, auth_state: dict[str, Any] | None) -> None:
        expires_at = (auth_state or {}).get("expires_at")
        if isinstance(expires_at, (int, float)) and (auth_state or {}).get("refresh_token"):
            self._expiry[name] = expires_at
        else:
            self._expiry.pop(name, None)

    async def refresh_user(self, user: Any, handler: Any = None, **kwargs: Any) -> Any:
        """Renew the access token before it expires; else oauthenticator's check of the current one; then apply
        the allow rules again to the provider's fresh answer.

        Returns True (nothing to change, or the provider cannot be reached now: keep the current auth rather than
        logging everyone out), False (the refresh token was refused: the user must log in again; or the allow rules
        no longer admit the user, who is then shut out, see :meth:`shut_out`) or a new auth model. A new auth_state
        is saved here, under a per-user lock, so the hub's own refresh and the background loop never spend the
        same refresh token twice; without a request (the background loop) admin status and groups are applied
        here too, as the hub does after a request's refresh.
        """
        if not self.enable_auth_state:
            return True
        lock = self._refresh_locks.setdefault(user.name, asyncio.Lock())
        async with lock:
            try:
                await self.ensure_discovered()
                auth_state = await user.get_auth_state()
                if auth_state and auth_state.get("refresh_token") and self._expires_soon(auth_state):
                    model = await self._refresh_with_token(user, auth_state, handler)
                else:
                    model = await super().refresh_user(user, handler, **kwargs)
                allowed = not isinstance(model, dict) or await self.still_allowed(user.name, model)
            except (ProviderError, *_PROVIDER_FAILURES) as e:
                self.log.warning(
                    "Could not refresh %s's login now (%s); keeping it until the provider answers",
                    user.name,
                    _describe(e),
                )
                return True
            if not allowed:
                self.shut_out(user)
                return False
            if isinstance(model, dict) and model.get("auth_state") and model["auth_state"] != auth_state:
                await user.save_auth_state(model["auth_state"])
                self._remember_expiry(user.name, model["auth_state"])
            if isinstance(model, dict) and handler is None:
                self._apply_admin_and_groups(user, model)
            return model

    def _apply_admin_and_groups(self, user: Any, model: dict[str, Any]) -> None:
        # What the hub's auth_to_user does after a request's refresh; the background loop has no request.
        admin = model.get("admin")
        if admin is not None and admin != user.admin:
            user.admin = admin
            roles.assign_default_roles(user.db, entity=user)
            self.log.info("%s is %s an admin (refreshed from the provider)", user.name, "now" if admin else "no longer")
        if self.manage_groups and model.get("groups") is not None:
            user.sync_groups(model["groups"])
        user.db.commit()

    async def _refresh_with_token(self, user: Any, auth_state: dict[str, Any], handler: Any) -> Any:
        refresh_token = auth_state["refresh_token"]
        try:
            token_info = await self.get_token_info(handler, self.build_refresh_token_request_params(refresh_token))
        except web.HTTPError as e:
            if e.status_code >= 500:
                raise ValueError("unusable token response") from None
            self.log.info("%s's refresh token was refused; they must log in again", user.name)
            return False
        except HTTPClientError as e:
            if e.code != 599 and 400 <= e.code < 500:
                self.log.info("%s's refresh token was refused (HTTP %s); they must log in again", user.name, e.code)
                return False
            raise
        if not token_info.get("refresh_token"):
            token_info["refresh_token"] = refresh_token  # providers may keep the refresh token unchanged
        model = await self._token_to_auth_model(token_info)
        self.log.info(
            "Renewed %s's access token (it expired in under %gs)", user.name, self.token_refresh_margin_seconds
        )
        return model

    async def refresh_expiring(self) -> int:
        """Renew every stored access token that expires within the margin; returns how many were renewed."""
        app = self.parent
        now = time.time()
        renewed = 0
        names = [
            name
            for (name,) in app.db.query(orm.User.name).filter(orm.User.encrypted_auth_state.isnot(None))
            if self._expiry.get(name, 0) - now < self.token_refresh_margin_seconds
        ]
        for name in names:
            try:
                user = app.users[name]
            except KeyError:
                continue
            auth_state = await user.get_auth_state()
            self._remember_expiry(name, auth_state)
            if not auth_state or not auth_state.get("refresh_token") or not self._expires_soon(auth_state):
                continue
            result = await self.refresh_user(user)
            if isinstance(result, dict):
                renewed += 1
            elif result is False:
                self.log.warning("%s must log in again (see above); their tokens are renewed at that login", name)
                # Do not ask again every interval: their next login stores new tokens.
                self._expiry[name] = float("inf")
        return renewed

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.token_refresh_interval_seconds)
            try:
                await self.refresh_expiring()
            except Exception:
                self.log.exception(
                    "Token refresh sweep failed; trying again in %gs", self.token_refresh_interval_seconds
                )


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _describe(exc: BaseException) -> str:
    """A short, token-free description of a failed provider request for the log."""
    if isinstance(exc, HTTPClientError):
        return f"HTTP {exc.code}"
    if isinstance(exc, ProviderError):
        return f"HTTP {exc.status_code}"
    return type(exc).__name__
