"""The monitor's page and JSON API, under the service's prefix (``/services/dolab-monitor/``).

- ``GET {prefix}``: the user's servers with their GPU use over time (inline SVG plots), spend, remaining quota,
  warnings and quota stops; with ``custom:dolab:read-usage`` (unfiltered) also every GPU with its holder and
  readings, every server and the totals. ``?user=NAME`` shows NAME's page, with that scope for NAME.
- ``GET {prefix}api/usage[?user=NAME]``: the same data as JSON (:meth:`~.sampler.Monitor.user_view`); naming
  another user takes ``custom:dolab:read-usage`` for them (403 otherwise).
- ``GET {prefix}api/overview``: every GPU, server, totals and warnings (:meth:`~.sampler.Monitor.overview`), with
  ``custom:dolab:read-usage`` for every user.
- ``GET {prefix}api/quota/NAME``: ``{"user", "allowed", "message", "limits", "warnings"}``: whether NAME may start a
  GPU or paid server now, with a sentence. Answered to NAME themself, to a token with ``custom:dolab:read-usage``
  for NAME, and to the monitor's own service token, which is what :class:`~.quotacheck.MonitorQuotaCheck` sends
  from the hub process (compared in constant time, without asking the hub).

The token's scopes decide, never the hub's admin flag (:mod:`dolab_services.scopes`): an admin's token limited to
``access:services!service=dolab-monitor`` sees only that admin's own usage.
- ``GET {prefix}metrics``: Prometheus text (:mod:`.metrics`); no login, nothing secret.

Everything else is behind the hub's OAuth (``HubOAuthenticated``): a browser logs in through the hub, a script sends
``Authorization: token <the user's API token>``; users need ``access:services!service=dolab-monitor`` (the shipped
config grants it through ``extra_user_scopes``). All requests here are reads (GET), so there is no XSRF to check.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from datetime import datetime, timezone
from typing import Any

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from tornado import web
from tornado.template import Template

from ..hubclient import HubAPIError
from ..scopes import READ_USAGE
from ..web import MAX_NAME_CHARS, JsonApiMixin, MetricsHandler, ServiceHandler, access_logger
from .plots import bar_chart, line_chart
from .sampler import Monitor

__all__ = ["make_app"]

PAGE = Template(
    """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>GPU use and spend - DO-LAB</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
section.server { border: 1px solid #ccc; border-radius: 6px; padding: 0.5rem 1rem; margin: 1rem 0; }
.warning { background: #fff3cd; border-left: 4px solid #e0a800; padding: 0.5rem; }
.exceeded { background: #fdecea; border-left: 4px solid #c62828; padding: 0.5rem; }
.muted { color: #666; }
</style>
</head>
<body>
<h1>GPU use and spend{% if view["user"] != me %} of {{ view["user"] }}{% end %}</h1>
<p><a href="{{ hub_home }}">Back to the hub</a>
{% if view["last_tick"] %}<span class="muted">(readings of {{ view["last_tick"] }})</span>{% end %}</p>

<section id="quota" data-allowed="{{ 'yes' if view['quota']['allowed'] else 'no' }}">
<h2>Quota</h2>
<p class="{{ '' if view['quota']['allowed'] else 'exceeded' }}">{{ view["quota"]["message"] }}</p>
{% if view["quota"]["limits"] %}
<table>
<tr><th>limit</th><th>used</th><th>of</th><th>left</th><th>resets</th></tr>
{% for s in view["quota"]["limits"] %}
<tr data-metric="{{ s['metric'] }}" data-period="{{ s['period'] }}">
<td>{{ units[s['metric']] }} per {{ s['period'] }}</td>
<td class="num">{{ "%.2f" % s["used"] }}</td><td class="num">{{ "%g" % s["limit"] }}</td>
<td class="num">{{ "%.2f" % s["remaining"] }}</td><td>{{ s["resets_at"] }}</td></tr>
{% end %}
</table>
{% end %}
{% for w in view["warnings"] %}<p class="warning" data-metric="{{ w['metric'] }}">{{ w["message"] }}</p>{% end %}
{% for s in view["stops"] %}<p class="exceeded stop">Stopped {{ label(s["server"]) }} at {{ s["at"] }}
for its quota ({{ s["detail"] }}): {{ s["outcome"] }}.</p>{% end %}
</section>

<section id="spend">
<h2>Use and spend</h2>
<table>
<tr><th></th><th>GPU-hours</th><th>USD</th></tr>
{% for period in ("day", "week", "month") %}
<tr data-period="{{ period }}"><td>{{ "today" if period == "day" else "this " + period }}</td>
<td class="num">{{ "%.3f" % view["usage"][period]["gpu_hours"] }}</td>
<td class="num">{{ "%.2f" % view["usage"][period]["usd"] }}</td></tr>
{% end %}
</table>
<p class="muted">GPU-hours per day, the last 30 days (UTC):</p>
{% raw daily_plot %}
</section>

<section id="servers">
<h2>Running servers</h2>
{% if not view["servers"] %}<p>You have no running server.</p>{% end %}
{% for s in view["servers"] %}
<section class="server" data-server="{{ s['server'] }}">
<h3>{{ label(s["server"]) }}</h3>
<p>Profile {{ s["profile"] or "(default)" }} on {{ s["backend"] or "?" }}, started {{ s["started"] }};
{% if s["gpus"] %}{{ ", ".join("%d x %s" % (n, t) for t, n in s["gpus"].items()) }}{% else %}no GPU{% end %};
{{ "%.2f" % s["usd_per_hour"] }} USD per hour.</p>
{% if s["gpus"] %}<p class="muted">GPU use (%), the latest readings:</p>
{% raw plots[(s["user"], s["server"])] %}{% end %}
</section>
{% end %}
</section>

{% if overview %}
<section id="admin">
<h2>Every GPU</h2>
<table>
<tr><th>host</th><th>GPU</th><th>type</th><th>holder</th><th>use %</th><th>memory GB</th><th>temp C</th>
<th>power W</th><th>processes</th></tr>
{% for g in overview["gpus"] %}
<tr class="gpu" data-uuid="{{ g['uuid'] }}"><td>{{ g["host"] }}</td>
<td>{{ g["index"] if g["index"] is not None else "" }}</td><td>{{ g["name"] }}</td>
<td class="holder">{{ g["holder"] or "free" }}</td><td class="num">{{ num(g.get("utilization_percent")) }}</td>
<td class="num">{{ num(g.get("memory_used_gb")) }} / {{ num(g.get("memory_total_gb")) }}</td>
<td class="num">{{ num(g.get("temperature_c")) }}</td><td class="num">{{ num(g.get("power_w")) }}</td>
<td class="num">{{ len(g.get("processes") or []) }}
{% if g["unattributed_processes"] %} (not a server's){% end %}</td></tr>
{% end %}
</table>
<h2>Totals</h2>
<p>{{ overview["totals"]["servers"] }} server(s) running, {{ overview["totals"]["gpus_held"] }} of
{{ overview["totals"]["gpus"] }} GPU(s) held, {{ "%.2f" % overview["totals"]["usd_per_hour"] }} USD per hour now;
this month {{ "%.2f" % overview["totals"]["month"]["gpu_hours"] }} GPU-hours and
{{ "%.2f" % overview["totals"]["month"]["usd"] }} USD.</p>
<p class="muted">Spend per day, every user, the last 30 days (UTC):</p>
{% raw overview_plot %}
<h2>Top users this month</h2>
<table><tr><th>user</th><th>GPU-hours</th><th>USD</th></tr>
{% for u in overview["top_users"] %}<tr><td><a href="?user={{ url_escape(u['user']) }}">{{ u["user"] }}</a></td>
<td class="num">{{ "%.3f" % u["gpu_hours"] }}</td><td class="num">{{ "%.2f" % u["usd"] }}</td></tr>{% end %}
</table>
<h2>Every server</h2>
<table><tr><th>server</th><th>backend</th><th>GPUs</th><th>use %</th><th>USD/h</th></tr>
{% for s in overview["servers"] %}<tr><td>{{ s["user"] }}/{{ s["server"] }}</td><td>{{ s["backend"] }}</td>
<td class="num">{{ sum(s["gpus"].values()) }}</td><td class="num">{{ num(s["utilization_percent"]) }}</td>
<td class="num">{{ "%.2f" % s["usd_per_hour"] }}</td></tr>{% end %}
</table>
</section>
{% end %}
</body>
</html>
"""
)
UNITS = {"gpu_hours": "GPU-hours", "usd": "USD"}


def _num(value: Any) -> str:
    return "" if value is None else f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"


def _label(server: str) -> str:
    return f"Server '{server}'" if server else "Default server"


class _Handler(ServiceHandler):
    """A monitor page: the user through the hub, and the monitor."""

    def initialize(self, monitor: Monitor, hub_auth: HubOAuth, service_token: str, log: logging.Logger) -> None:
        self.monitor = monitor
        self.hub_auth = hub_auth
        self.service_token = service_token
        self.log = log

    def target_user(self) -> str:
        """``?user=`` (another user: with ``custom:dolab:read-usage`` for them) or the current user."""
        user = self.get_query_argument("user", "") or self.user_name
        self.check_reader(user)
        return user

    def check_reader(self, user: str) -> None:
        """403 unless ``user`` is the requester or the token may read their usage; 400 for an impossible name."""
        if user == self.user_name:
            return
        if not self.has_scope(READ_USAGE, post_filter=True):
            raise web.HTTPError(403, "You can only see your own usage.")
        if len(user) > MAX_NAME_CHARS:
            raise web.HTTPError(400, f"A user name has at most {MAX_NAME_CHARS} characters.")
        self.require_scope(READ_USAGE, "You can only see your own usage.", user)

    def failure(self, error: Exception, user: str) -> web.HTTPError:
        """404 for a user the hub does not know, else :meth:`hub_down`."""
        if isinstance(error, HubAPIError) and error.status == 404:
            return web.HTTPError(404, f"There is no user {user!r}.")
        return self.hub_down(error)

    def hub_down(self, error: Exception) -> web.HTTPError:
        """The answer when the hub or the ledger does not answer; details go to the log."""
        self.log.error("The monitor cannot answer %s: %s", self.request.path, error or type(error).__name__)
        return web.HTTPError(502, "The usage data cannot be read right now; try again in a minute.")


class PageHandler(_Handler):
    """The dashboard page."""

    @web.authenticated
    async def get(self) -> None:
        user = self.target_user()
        try:
            view = await self.monitor.user_view(user)
            everyone = self.has_scope(READ_USAGE) and user == self.user_name
            overview = await self.monitor.overview() if everyone else None
        except Exception as e:  # the hub or the database
            raise self.failure(e, user) from None
        plots = {
            (s["user"], s["server"]): line_chart(
                [(h["t"], h["utilization_percent"]) for h in s["history"]],
                y_max=100,
                title=f"GPU use of {_label(s['server']).lower()} (%)",
            )
            for s in view["servers"]
        }
        daily_plot = bar_chart(
            [(d["day"], d["gpu_hours"]) for d in view["daily"]], unit=" GPU-h", title="GPU-hours per day, 30 days"
        )
        overview_plot = (
            bar_chart([(d["day"], d["usd"]) for d in overview["daily"]], unit=" USD", title="Spend per day, all users")
            if overview
            else ""
        )
        hub_prefix = self.hub_auth.hub_prefix or "/hub/"
        self.set_header("Cache-Control", "no-store")
        self.finish(
            PAGE.generate(
                view=view,
                overview=overview,
                me=self.user_name,
                plots=plots,
                daily_plot=daily_plot,
                overview_plot=overview_plot,
                hub_home=f"{hub_prefix}home",
                units=UNITS,
                label=_label,
                num=_num,
            )
        )


class _ApiHandler(JsonApiMixin, _Handler):
    """The monitor's JSON API."""


class UsageHandler(_ApiHandler):
    """One user's data (the page's, as JSON)."""

    @web.authenticated
    async def get(self) -> None:
        user = self.target_user()
        try:
            view = await self.monitor.user_view(user)
        except Exception as e:
            raise self.failure(e, user) from None
        self.reply(view)


class OverviewHandler(_ApiHandler):
    """Admins: every GPU, server and the totals."""

    @web.authenticated
    async def get(self) -> None:
        self.require_scope(READ_USAGE, "Seeing every GPU and server takes the custom:dolab:read-usage scope.")
        try:
            self.reply(await self.monitor.overview())
        except Exception as e:
            raise self.hub_down(e) from None


class QuotaHandler(_ApiHandler):
    """May this user start a GPU or paid server now? For the user, readers of their usage, and the hub's check."""

    _service = False

    async def prepare(self) -> None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if (
            self.service_token
            and scheme.lower() in ("token", "bearer")
            and hmac.compare_digest(token.strip().encode(), self.service_token.encode())
        ):
            self._service = True  # the hub's quota check: no round trip to the hub while it spawns
            return
        await super().prepare()

    async def get(self, user: str) -> None:
        if not self._service:
            if not self.current_user:
                self.get_login_url()
            if user != self.user_name:
                self.check_reader(user)
        try:
            status = await self.monitor.quota_status(user)
        except Exception as e:
            raise self.failure(e, user) from None
        self.reply(
            {
                "user": user,
                "allowed": not status.exceeded,
                "message": status.refusal() or status.summary(),
                "quota": status.quota.source,
                "limits": [s.to_json() for s in status.limits],
                "warnings": [w.to_json() for w in self.monitor.enforcer.warnings.get(user, [])],
                "at": datetime.now(timezone.utc).isoformat(),
            }
        )


def make_app(
    monitor: Monitor,
    prefix: str,
    *,
    service_token: str = "",
    hub_auth: HubOAuth | None = None,
    log: logging.Logger | None = None,
) -> web.Application:
    """The tornado application under ``prefix``; OAuth settings from the environment the hub gives services."""
    prefix = "/" + prefix.strip("/") + "/"
    hub_auth = hub_auth or HubOAuth.instance(cache_max_age=60)
    log = log or monitor.log
    args = {"monitor": monitor, "hub_auth": hub_auth, "service_token": service_token, "log": log}
    return web.Application(
        [
            (prefix.rstrip("/"), web.RedirectHandler, {"url": prefix}),
            (prefix, PageHandler, args),
            (prefix + "oauth_callback", HubOAuthCallbackHandler),
            (prefix + "api/usage", UsageHandler, args),
            (prefix + "api/overview", OverviewHandler, args),
            (prefix + r"api/quota/([^/]+)", QuotaHandler, args),
            (prefix + "metrics", MetricsHandler, {"registry": monitor.metrics.registry}),
        ],
        cookie_secret=secrets.token_bytes(32),
        log_function=access_logger(log),
    )
