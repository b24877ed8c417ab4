"""What every DO-LAB hub-managed service application shares: the hub's log format, the page's listener, and
the work loop that one failure never ends."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from tornado import httpserver, web
from traitlets import default
from traitlets.config import Application

from .hubclient import HubAPIError

__all__ = ["ServiceApp"]


class ServiceApp(Application):
    """A traitlets Application whose log lines look like the hub's, which a managed service's output joins."""

    @default("log_level")
    def _default_log_level(self) -> int:
        return logging.INFO

    @default("log_format")
    def _default_log_format(self) -> str:
        return "[%(levelname)1.1s %(asctime)s.%(msecs).03d %(name)s] %(message)s"

    @default("log_datefmt")
    def _default_log_datefmt(self) -> str:
        return "%Y-%m-%d %H:%M:%S"

    def serve_page(
        self,
        make_app: Callable[[str], web.Application],
        service_name: str,
        *,
        serves: str,
        goes_on: str,
        port_variable: str,
    ) -> httpserver.HTTPServer | None:
        """Listen where the hub expects the service (``$JUPYTERHUB_SERVICE_URL``) with ``make_app(prefix)``.

        Without that variable, or when the port is taken, the service's main work goes on without its page: a line
        in the log says so (``serves``: what is off; ``goes_on``: what continues; ``port_variable``: the setting
        that moves the port).
        """
        service_url = os.environ.get("JUPYTERHUB_SERVICE_URL", "")
        if not service_url:
            self.log.warning("No JUPYTERHUB_SERVICE_URL: %s are off, %s go on", serves, goes_on)
            return None
        where = urlsplit(service_url)
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{service_name}/")
        app = make_app(prefix)
        try:
            server = app.listen(where.port or 80, where.hostname or "127.0.0.1", xheaders=True)
        except OSError as e:
            self.log.error(
                "Cannot listen on %s (%s): the %s are off, %s go on. Is another service on that port? Set %s.",
                service_url,
                e.strerror or e,
                serves,
                goes_on,
                port_variable,
            )
            return None
        self.log.info("%s at %s (listening on %s)", serves[:1].upper() + serves[1:], prefix, service_url)
        return server

    async def repeat(
        self, work: Callable[[], Awaitable[Any]], interval_seconds: float, what: str, *, min_wait_seconds: float = 0
    ) -> None:
        """Run ``work`` every ``interval_seconds`` forever. A hub that does not answer, or a bug in one round, is
        logged and the next round comes as planned: one failure never ends the service."""
        while True:
            began = time.monotonic()
            try:
                await work()
            except HubAPIError as e:
                self.log.error("Cannot list the hub's servers, so nothing is done this %s: %s", what, e)
            except Exception:  # a bug in one round must not end the service
                self.log.exception("The %s failed; trying again in %g s", what, interval_seconds)
            await asyncio.sleep(max(min_wait_seconds, interval_seconds - (time.monotonic() - began)))
