"""The culler's page and API, under the service's prefix (``/services/dolab-culler/``).

- ``GET  {prefix}``: the user's running servers, their stop times and warnings, with one-click buttons "Extend
  by N hours" and, for an idle warning, "Keep it running" (forms POSTed back to the page);
- ``GET  {prefix}lab-session``: a tiny page the JupyterLab notice loads in a hidden frame: the user, the XSRF
  value for its API calls, how often to poll (see :class:`LabSessionHandler`);
- ``GET  {prefix}api/warnings``: ``{"warnings": [{"server", "reason", "stop_at", "message"}, ...]}``, soonest
  first, for the current user; a deadline warning adds ``extend_hours``, what one click extends by (0: none);
- ``POST {prefix}api/extend``: ``{"server": name, "hours": n}``, answers ``{"server", "stop_at"}``; a 400 with a
  sentence beyond ``--max-run-hours`` from now (or :data:`MAX_EXTEND_HOURS`), for a server the user does not run,
  or one with no stop time;
- ``POST {prefix}api/keepalive``: ``{"server": name}``: record the server as used now (an idle warning goes);
- ``POST {prefix}api/stop``: ``{"user": name, "server": name}``: the stop path, reason ``admin``, for a token with
  ``custom:dolab:stop-servers`` (for that user or server);
- ``GET  {prefix}metrics``: Prometheus text (stop counters by reason; no secrets, so no login).

Everything but the metrics is behind the hub's OAuth (``HubOAuthenticated``): a browser logs in through the hub,
a script sends ``Authorization: token <the user's API token>``. Users need ``access:services!service=dolab-culler``
(the shipped config grants it to every user); that is all it takes to extend or keep alive one's own servers.
Naming another user's server (``"user"`` in the body) takes ``custom:dolab:extend-servers`` for that user, and
``api/stop`` takes ``custom:dolab:stop-servers``: the token's scopes decide, never the hub's admin flag
(:mod:`dolab_services.scopes`). XSRF: a cookie-authenticated POST is accepted only with the
session's ``_xsrf`` value (a form field, or the ``X-XSRFToken`` header); JupyterHub's ``HubOAuth`` checks it before
it accepts the cookie, so no global ``xsrf_cookies`` setting is needed (it would refuse token-authenticated API
calls, which need none). JupyterHub 6.1 asks for it on a script's ``fetch`` GET too (only page navigations are
exempt), which is why the JupyterLab notice first loads ``lab-session`` in a frame: a navigation, so the OAuth
redirects run and the ``_xsrf`` cookie is set, and the page hands over the value to send.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from tornado import web
from tornado.template import Template

from dolab_core.times import format_time, utcnow

from ..hubclient import HubAPIError
from ..scopes import EXTEND_SERVERS, STOP_SERVERS
from ..web import JsonApiMixin, MetricsHandler, ServiceHandler, access_logger, bounded_number
from .extensions import extend_offer, headroom_hours
from .sweeper import Sweeper

__all__ = ["MAX_EXTEND_HOURS", "make_app"]

#: The most hours one extension may add, whatever the policy (about 11 years: beyond it a stop time means nothing).
MAX_EXTEND_HOURS = 100_000.0

PAGE = Template(
    """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Your servers' stop times - DO-LAB</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
section.server { border: 1px solid #ccc; border-radius: 6px; padding: 0.5rem 1rem; margin: 1rem 0; }
.warning { background: #fff3cd; border-left: 4px solid #e0a800; padding: 0.5rem; }
.notice { background: #e7f5e9; border-left: 4px solid #2e7d32; padding: 0.5rem; }
.error { background: #fdecea; border-left: 4px solid #c62828; padding: 0.5rem; }
form { display: inline-block; margin-right: 0.5rem; }
button { font-size: 1rem; padding: 0.3rem 0.8rem; }
</style>
</head>
<body>
<h1>Your running servers</h1>
<p><a href="{{ hub_home }}">Back to the hub</a></p>
{% if notice %}<p class="notice" role="status">{{ notice }}</p>{% end %}
{% if error %}<p class="error" role="alert">{{ error }}</p>{% end %}
{% if not servers %}<p>You have no running server.</p>{% end %}
{% for s in servers %}
<section class="server" data-server="{{ s.name }}">
<h2>{{ s.label }}</h2>
<p>Profile {{ s.profile or "(default)" }}, started {{ fmt(s.started) }}.</p>
{% if s.stop_at %}
<p class="stop-at">Stops at <time datetime="{{ fmt(s.stop_at) }}">{{ fmt(s.stop_at) }}</time>,
the stop time you chose.</p>
{% else %}
<p class="stop-at">No stop time: it runs while it is in use.</p>
{% end %}
{% if s.warning %}<p class="warning" data-reason="{{ s.warning.reason }}">{{ s.warning.message() }}</p>{% end %}
{% if s.stop_at is not None %}
  {% set hours = offer(s.headroom_hours, extend_hours) %}
  {% if hours > 0 %}
<form method="post" action="{{ page_url }}" class="extend">
<input type="hidden" name="_xsrf" value="{{ xsrf }}">
<input type="hidden" name="action" value="extend">
<input type="hidden" name="server" value="{{ s.name }}">
<input type="hidden" name="hours" value="{{ '%g' % hours }}">
<button type="submit">Extend by {{ '%g' % hours }} hour{{ '' if hours == 1 else 's' }}</button>
</form>
  {% else %}
<p>This is the latest stop time allowed.</p>
  {% end %}
{% end %}
{% if s.warning and s.warning.reason == "idle" %}
<form method="post" action="{{ page_url }}" class="keepalive">
<input type="hidden" name="_xsrf" value="{{ xsrf }}">
<input type="hidden" name="action" value="keepalive">
<input type="hidden" name="server" value="{{ s.name }}">
<button type="submit">Keep it running</button>
</form>
{% end %}
</section>
{% end %}
</body>
</html>
"""
)


class _Handler(ServiceHandler):
    """A culler page: the user through the hub, the sweeper, the extension offer."""

    def initialize(
        self, sweeper: Sweeper, hub_auth: HubOAuth, extend_hours: float, poll_seconds: float, log: logging.Logger
    ) -> None:
        self.sweeper = sweeper
        self.hub_auth = hub_auth
        self.extend_hours = extend_hours
        self.poll_seconds = poll_seconds
        self.log = log

    def hub_down(self, error: HubAPIError) -> web.HTTPError:
        """The answer when the hub does not answer the culler; the details go to the log."""
        self.log.error("The hub did not answer the culler: %s", error)
        return web.HTTPError(502, "The hub did not answer; try again in a minute.")


class PageHandler(_Handler):
    """The user's servers, stop times and warnings, with the extend and keep-alive buttons."""

    @web.authenticated
    async def get(self) -> None:
        await self._render()

    @web.authenticated
    async def post(self) -> None:
        action = self.get_body_argument("action", "")
        server = self.get_body_argument("server", "")
        try:
            if action == "extend":
                text = self.get_body_argument("hours", "")
                try:
                    hours: Any = float(text) if len(text) <= 40 else text
                except ValueError:
                    hours = text
                new = await self.sweeper.extend(self.user_name, server, extend_hours(hours))
                notice = f"Extended: it now stops at {format_time(new)}."
            elif action == "keepalive":
                await self.sweeper.keep_alive(self.user_name, server)
                notice = "Noted: it keeps running while you use it."
            else:
                raise ValueError(f"Unknown action {action!r}: use the page's buttons.")
        except ValueError as e:
            self.set_status(400)
            await self._render(error=str(e))
            return
        except HubAPIError as e:
            raise self.hub_down(e) from None
        await self._render(notice=notice)

    async def _render(self, notice: str = "", error: str = "") -> None:
        try:
            servers = await self.sweeper.servers_of(self.user_name)
        except HubAPIError as e:
            raise self.hub_down(e) from None
        hub_prefix = self.hub_auth.hub_prefix or "/hub/"
        self.set_header("Cache-Control", "no-store")
        self.finish(
            PAGE.generate(
                servers=servers,
                notice=notice,
                error=error,
                xsrf=self.xsrf_token,
                page_url=self.request.path,
                hub_home=f"{hub_prefix}home",
                extend_hours=self.extend_hours,
                offer=extend_offer,
                fmt=format_time,
            )
        )


class _ApiHandler(JsonApiMixin, _Handler):
    """The culler's JSON API."""

    def server_arg(self, data: dict[str, Any]) -> str:
        server = data.get("server", "")
        if not isinstance(server, str) or len(server) > 255:
            raise web.HTTPError(400, 'server must be a server name ("" for the default server).')
        return server

    def owner(self, data: dict[str, Any], server: str) -> str:
        """The user named in the body (default: the current one); another user's server takes a token with
        ``custom:dolab:extend-servers`` for it."""
        user = self.name(data.get("user", self.user_name), "user")
        if user != self.user_name:
            self.require_scope(
                EXTEND_SERVERS,
                "You can only change your own servers (another user's takes the custom:dolab:extend-servers scope).",
                user,
                server,
            )
        return user


class WarningsHandler(_ApiHandler):
    """The current user's warnings; a deadline warning says how many hours one click extends by (0: none)."""

    @web.authenticated
    def get(self) -> None:
        now, warnings = utcnow(), []
        for warning in self.sweeper.warnings_for(self.user_name):
            data = warning.to_json()
            if warning.reason == "deadline":
                headroom = headroom_hours(warning.stop_at, now, self.sweeper.max_run_hours_for(self.user_name))
                data["extend_hours"] = extend_offer(headroom, self.extend_hours)
            warnings.append(data)
        self.reply({"warnings": warnings})


class LabSessionHandler(_Handler):
    """What the JupyterLab notice needs to call the API with the browser's login: a tiny page it loads in a hidden
    frame (a navigation, so the hub's OAuth redirects are followed and the ``_xsrf`` cookie is set), holding the
    user's name, the XSRF value to send as ``X-XSRFToken``, how often to poll and the page's address."""

    @web.authenticated
    def get(self) -> None:
        xsrf = self.xsrf_token
        session = {
            "user": self.user_name,
            "xsrf": xsrf.decode() if isinstance(xsrf, bytes) else str(xsrf),
            "poll_seconds": self.poll_seconds,
            "page": self.request.path.rsplit("/", 1)[0] + "/",
        }
        # "</" would end the script element early; JSON allows the escaped slash.
        payload = json.dumps(session).replace("</", "<\\/")
        self.set_header("Cache-Control", "no-store")
        self.finish(
            "<!doctype html>\n<title>DO-LAB culler session</title>\n"
            f'<script type="application/json" id="dolab-culler-session">{payload}</script>\n'
        )


class ExtendHandler(_ApiHandler):
    """Move a server's stop time later."""

    @web.authenticated
    async def post(self) -> None:
        data = self.body()
        server = self.server_arg(data)
        user = self.owner(data, server)
        try:
            new = await self.sweeper.extend(user, server, extend_hours(data.get("hours")))
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        except HubAPIError as e:
            raise self.hub_down(e) from None
        self.reply({"user": user, "server": server, "stop_at": format_time(new)})


class KeepAliveHandler(_ApiHandler):
    """Record an idle server as used now."""

    @web.authenticated
    async def post(self) -> None:
        data = self.body()
        server = self.server_arg(data)
        user = self.owner(data, server)
        try:
            await self.sweeper.keep_alive(user, server)
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        except HubAPIError as e:
            raise self.hub_down(e) from None
        self.reply({"user": user, "server": server})


class StopHandler(_ApiHandler):
    """A token with ``custom:dolab:stop-servers`` stops a server through the stop path (pre-stop hooks first),
    reason ``admin``."""

    @web.authenticated
    async def post(self) -> None:
        refusal = "Stopping servers here takes the custom:dolab:stop-servers scope."
        if not self.has_scope(STOP_SERVERS, post_filter=True):
            raise web.HTTPError(403, refusal)  # no grant at all: refused before the body is read
        data = self.body()
        user, server = data.get("user"), self.server_arg(data)
        if not isinstance(user, str) or not user or len(user) > 255:
            raise web.HTTPError(400, "user must be the name of the server's owner.")
        self.require_scope(STOP_SERVERS, refusal, user, server)
        self.log.info("%s asks to stop server %s/%s", self.user_name, user, server)
        outcome = await self.sweeper.stop_path.stop(user, server, "admin", f"by {self.user_name}")
        if outcome == "gone":
            raise web.HTTPError(404, f"{user} has no running server {server!r}.")
        if outcome == "blocked":
            raise web.HTTPError(409, "A pre-stop hook refused to let the server stop (see the log); try again.")
        if outcome == "failed":
            raise web.HTTPError(502, "The hub did not stop the server (see the culler's log).")
        self.reply({"user": user, "server": server, "result": outcome})


def extend_hours(value: Any) -> float:
    """An extension's ``hours``: a number above 0 and at most :data:`MAX_EXTEND_HOURS`; ValueError, a sentence."""
    return bounded_number(value, "hours", minimum=0, maximum=MAX_EXTEND_HOURS, above_minimum=True)


def make_app(
    sweeper: Sweeper,
    prefix: str,
    *,
    extend_hours: float = 2,
    poll_seconds: float = 60,
    hub_auth: HubOAuth | None = None,
    log: logging.Logger | None = None,
) -> web.Application:
    """The tornado application under ``prefix`` (``/services/dolab-culler/``); OAuth settings from the env."""
    prefix = "/" + prefix.strip("/") + "/"
    # The instance the OAuth callback handler uses too (it has no other way to get one).
    hub_auth = hub_auth or HubOAuth.instance(cache_max_age=60)
    args = {
        "sweeper": sweeper,
        "hub_auth": hub_auth,
        "extend_hours": extend_hours,
        "poll_seconds": poll_seconds,
        "log": log or sweeper.log,
    }
    return web.Application(
        [
            (prefix.rstrip("/"), web.RedirectHandler, {"url": prefix}),
            (prefix, PageHandler, args),
            (prefix + "oauth_callback", HubOAuthCallbackHandler),
            (prefix + "lab-session", LabSessionHandler, args),
            (prefix + "api/warnings", WarningsHandler, args),
            (prefix + "api/extend", ExtendHandler, args),
            (prefix + "api/keepalive", KeepAliveHandler, args),
            (prefix + "api/stop", StopHandler, args),
            (prefix + "metrics", MetricsHandler, {"registry": sweeper.stop_path.registry}),
        ],
        cookie_secret=secrets.token_bytes(32),
        log_function=access_logger(log or sweeper.log),
    )
