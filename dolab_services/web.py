"""What every DO-LAB service's pages and JSON APIs share: the user through the hub's OAuth, JSON errors as
sentences, the access log and the Prometheus endpoint.

A service's handlers derive from :class:`ServiceHandler` (pages) and add :class:`JsonApiMixin` in front for JSON
endpoints::

    class _Handler(ServiceHandler): ...                 # initialize() sets self.hub_auth and self.log
    class _ApiHandler(JsonApiMixin, _Handler): ...
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from jupyterhub.services.auth import HubOAuth, HubOAuthenticated
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from tornado import web

__all__ = ["JsonApiMixin", "MetricsHandler", "ServiceHandler", "access_logger"]


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

    @property
    def is_admin(self) -> bool:
        """Whether the hub says the requester is an admin."""
        return bool(self.current_user.get("admin"))


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
        """The request's JSON object (empty body: ``{}``); 400 with a sentence otherwise."""
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError:
            raise web.HTTPError(400, "The body must be JSON.") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "The body must be a JSON object.")
        return data

    def reply(self, data: Any) -> None:
        """Answer ``data`` as JSON, never cached."""
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data))


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
