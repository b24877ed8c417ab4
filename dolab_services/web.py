"""What every DO-LAB service's pages and JSON APIs share: the user through the hub's OAuth, JSON errors as
sentences, the access log and the Prometheus endpoint.

A service's handlers derive from :class:`ServiceHandler` (pages) and add :class:`JsonApiMixin` in front for JSON
endpoints::

    class _Handler(ServiceHandler): ...                 # initialize() sets self.hub_auth and self.log
    class _ApiHandler(JsonApiMixin, _Handler): ...

Who may do what is decided from the request's scopes (:meth:`ServiceHandler.require_scope` with DO-LAB's own
scopes, :mod:`dolab_services.scopes`), never from the hub's ``admin`` flag: a token limited to one service must not
act as its admin owner. Everything a request brings is bounded: the body's size and depth, numbers (finite, within
a range: :func:`bounded_number`), names (:func:`name_arg`); refusals are 400s with a sentence that quotes at most a
short piece of what was sent (:func:`shown`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from jupyterhub.scopes import has_scope
from jupyterhub.services.auth import HubOAuth, HubOAuthenticated
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from tornado import web

from dolab_core.text import shown

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_NAME_CHARS",
    "JsonApiMixin",
    "MetricsHandler",
    "ServiceHandler",
    "access_logger",
    "bounded_number",
    "name_arg",
    "shown",
]

#: The largest JSON body a service API reads (a restore's list of paths is the biggest legitimate one).
MAX_BODY_BYTES = 4 * 1024 * 1024
#: The hub keeps user and server names in 255-character columns; anything longer names nobody.
MAX_NAME_CHARS = 255


def bounded_number(value: Any, what: str, *, minimum: float, maximum: float, above_minimum: bool = False) -> float:
    """``value`` as a float when it is a JSON number within ``[minimum, maximum]`` (``above_minimum``: the minimum
    itself excluded); ValueError with a sentence otherwise (a string, a bool, NaN, an infinity, a huge int).

    Compared before any conversion: Python compares a 400-digit int with a float exactly, where ``float()`` of it
    would raise OverflowError.
    """
    low = f"above {minimum:g}" if above_minimum else f"from {minimum:g}"
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        inside = (minimum < value if above_minimum else minimum <= value) and value <= maximum  # NaN: False
        if inside:
            return float(value)
    raise ValueError(f"{what} must be a number {low} to {maximum:g}, not {shown(value)}.")


def name_arg(value: Any, what: str) -> str:
    """A user's or server's name from a request: a string of at most :data:`MAX_NAME_CHARS` characters;
    ValueError with a sentence otherwise."""
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{what} must be a name of at most {MAX_NAME_CHARS} characters, not {shown(value)}.")
    return value


class ServiceHandler(HubOAuthenticated, web.RequestHandler):
    """A page of a hub service: the user is asked of the hub without blocking the loop, before the method runs.

    Subclasses set ``self.hub_auth`` (a :class:`HubOAuth`) and ``self.log`` in ``initialize()``.
    """

    hub_auth: HubOAuth
    log: logging.Logger

    async def prepare(self) -> None:
        # Ask the hub without blocking the loop; get_current_user then finds the cached answer.
        await self.hub_auth.get_user(self, sync=False)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # A refusal (HTTPError) is the answer itself, in the access log; only real failures get a traceback.
        if not isinstance(value, web.HTTPError):
            super().log_exception(typ, value, tb)

    @property
    def user_name(self) -> str:
        """The name of the user (or service) making the request."""
        return str(self.current_user["name"])

    def has_scope(
        self, scope: str, user: str | None = None, server: str | None = None, *, post_filter: bool = False
    ) -> bool:
        """Whether the request's token holds ``scope``: for every user (``user`` None), for ``user``, or for the
        server ``user``/``server`` (``""``: the default one); with ``post_filter``, for anyone at all (the caller
        checks the filter later). Filters follow the hub's: ``!user=`` grants that user's servers, ``!server=`` one
        server. The scopes are the token's (the hub's answer for it), so a token its owner limited holds only what
        it was given, admin or not."""
        held = frozenset(self.current_user.get("scopes") or ())
        if user is None:
            return bool(has_scope(scope, held, post_filter=post_filter))
        if not user:
            return False  # names nobody (and the hub's helper refuses an empty filter)
        wanted = f"{scope}!user={user}" if server is None else f"{scope}!server={user}/{server}"
        return bool(has_scope(wanted, held))

    def require_scope(self, scope: str, message: str, user: str | None = None, server: str | None = None) -> None:
        """403 with ``message`` unless the request holds ``scope`` (as :meth:`has_scope` asks it)."""
        if not self.has_scope(scope, user, server):
            raise web.HTTPError(403, message)


class JsonApiMixin(web.RequestHandler):
    """JSON in and out; errors as ``{"status", "message"}`` with the sentence; no redirect to a login page."""

    def get_login_url(self) -> str:
        raise web.HTTPError(403, "Log in to the hub first, or send your API token (Authorization: token ...).")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = self._reason
        exc_info = kwargs.get("exc_info")
        if exc_info and isinstance(exc_info[1], web.HTTPError) and exc_info[1].log_message:
            text = str(exc_info[1].log_message)
            message = text % exc_info[1].args if exc_info[1].args else text
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": message}))

    def body(self) -> dict[str, Any]:
        """The request's JSON object (empty body: ``{}``); 400 with a sentence otherwise: not JSON, over
        :data:`MAX_BODY_BYTES`, nested too deep, or with ``NaN``/``Infinity`` (which Python's json would accept)."""
        raw = self.request.body or b"{}"
        if len(raw) > MAX_BODY_BYTES:
            raise web.HTTPError(413, f"The body is over {MAX_BODY_BYTES // (1024 * 1024)} MiB; send less.")
        try:
            data = json.loads(raw, parse_constant=_no_constant)
        except RecursionError:
            raise web.HTTPError(400, "The body is nested too deeply.") from None
        except ValueError as e:  # also a number of more than 4300 digits, and _no_constant's
            raise web.HTTPError(400, str(e) if isinstance(e, _NotJsonNumber) else "The body must be JSON.") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "The body must be a JSON object.")
        return data

    def number(
        self, data: dict[str, Any], key: str, *, minimum: float, maximum: float, above_minimum: bool = False
    ) -> float:
        """``data[key]`` checked by :func:`bounded_number`; 400 with its sentence."""
        try:
            return bounded_number(data.get(key), key, minimum=minimum, maximum=maximum, above_minimum=above_minimum)
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None

    def name(self, value: Any, what: str) -> str:
        """``value`` checked by :func:`name_arg`; 400 with its sentence."""
        try:
            return name_arg(value, what)
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None

    def reply(self, data: Any) -> None:
        """Answer ``data`` as JSON, never cached."""
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data))


class _NotJsonNumber(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity`` in a body: not JSON, though Python's json reads them."""


def _no_constant(name: str) -> Any:
    raise _NotJsonNumber(f"{name} is not a JSON number; send finite numbers only.")


class MetricsHandler(web.RequestHandler):
    """The Prometheus text of one registry (``initialize(registry=...)``)."""

    def initialize(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.registry))


def access_logger(log: logging.Logger) -> Callable[[web.RequestHandler], None]:
    """tornado's ``log_function``: one line per request, at debug for successes, info for refusals, error for
    failures (health checks and polls stay out of an info log)."""

    def log_request(handler: web.RequestHandler) -> None:
        status = handler.get_status()
        level = logging.DEBUG if status < 400 else logging.INFO if status < 500 else logging.ERROR
        request = handler.request
        log.log(level, "%d %s %s %.1f ms", status, request.method, request.path, 1000 * request.request_time())

    return log_request
