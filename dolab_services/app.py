"""What every DO-LAB hub-managed service application shares: the hub's log format, the page's listener, the work
loop that one failure never ends, and a fast, quiet stop on SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import urlsplit

from tornado import httpserver, web
from traitlets import default
from traitlets.config import Application

from .hubclient import HubAPIError

__all__ = ["CLEANUP_SECONDS", "STOP_SIGNALS", "ServiceApp"]

#: What stops a service: the hub sends SIGINT, then SIGTERM 30 s later (LocalProcessSpawner.stop), one service after
#: the other; admins and systemd send SIGTERM.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: How long a stopping service's clean-up (closing its page and clients, revoking tokens) may take (seconds).
CLEANUP_SECONDS = 1.5


def _exit_before_the_loop(signum: int, frame: FrameType | None) -> None:
    """A stop signal while the service is still starting: nothing runs yet that needs closing."""
    raise SystemExit(0)


class ServiceApp(Application):
    """A traitlets Application whose log lines look like the hub's, which a managed service's output joins.

    A service's ``main`` is :meth:`launch_instance`. It checks its settings in ``start()`` (:meth:`fail` for a bad
    one), then hands its async main to :meth:`run_until_stopped`, which ends it at SIGINT or SIGTERM: the main task
    is cancelled (its ``finally`` closes the page's server and the clients), and the process exits 0 at once,
    without a traceback.
    """

    @default("log_level")
    def _default_log_level(self) -> int:
        return logging.INFO

    @default("log_format")
    def _default_log_format(self) -> str:
        return "[%(levelname)1.1s %(asctime)s.%(msecs).03d %(name)s] %(message)s"

    @default("log_datefmt")
    def _default_log_datefmt(self) -> str:
        return "%Y-%m-%d %H:%M:%S"

    @classmethod
    def launch_instance(cls, argv: Any = None, **kwargs: Any) -> None:
        """The program (``python -m ...``): read the command line and start. A stop signal that comes before the
        service runs ends it quietly too."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, _exit_before_the_loop)
        super().launch_instance(argv, **kwargs)

    def fail(self, message: str) -> NoReturn:
        """A setting that cannot work: one sentence on stderr, exit status 2."""
        print(f"{self.name}: {message}", file=sys.stderr)
        self.exit(2)
        raise SystemExit(2)  # Application.exit exits; this tells type checkers so

    def share_log(self, package: str = "dolab_services") -> None:
        """Log what the modules of ``package`` log (under their own names) through this app's handler and level."""
        package_log = logging.getLogger(package)
        package_log.setLevel(self.log.level)
        for handler in self.log.handlers:
            package_log.addHandler(handler)

    def run_until_stopped(self, main: Callable[[], Awaitable[int]]) -> NoReturn:
        """Run ``main()`` on a new event loop and exit with its status, or with 0 at SIGINT or SIGTERM.

        A signal cancels the main task: its ``finally`` blocks close what it opened (page, clients, pools), then
        the process ends at once, without asyncio's own shutdown: that would wait for every call still running in
        a worker thread (a Docker or RunPod request, a database query, a GPU read) for as long as its own timeout
        allows, and the hub waits for each service in turn before it stops the next. A clean-up that takes more
        than :data:`CLEANUP_SECONDS` is not waited for either.
        """
        code = asyncio.run(self._until_signal(main))
        self.exit(code)
        raise SystemExit(code)  # Application.exit exits; this tells type checkers so

    async def _until_signal(self, main: Callable[[], Awaitable[int]]) -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stopped_by: list[int] = []

        def stop(signum: int) -> None:
            if not stopped_by:
                stopped_by.append(signum)
                task.cancel()
                loop.call_later(CLEANUP_SECONDS, self._end_now, signum, "before its clean-up finished")

        before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop, signum)
        code = 0
        try:
            code = await main()
        except asyncio.CancelledError:
            if not stopped_by:
                raise
        finally:
            for signum, handler in before.items():
                loop.remove_signal_handler(signum)
                signal.signal(signum, handler)
        if stopped_by:
            self._end_now(stopped_by[0])
        return code

    def _end_now(self, signum: int, how: str = "") -> NoReturn:
        """End the process with status 0, its log written out, nothing else waited for."""
        self.log.info("Stopped (%s)%s", signal.Signals(signum).name, f" {how}" if how else "")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

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
        self,
        work: Callable[[], Awaitable[Any]],
        interval_seconds: float,
        what: str,
        *,
        min_wait_seconds: float = 0,
        once: bool = False,
    ) -> None:
        """Run ``work`` every ``interval_seconds`` until cancelled (``once``: one round). A hub that does not
        answer, or a bug in one round, is logged and the next round comes as planned: one failure never ends the
        service."""
        while True:
            began = time.monotonic()
            try:
                await work()
            except HubAPIError as e:
                self.log.error("Cannot list the hub's servers, so nothing is done this %s: %s", what, e)
            except Exception:  # a bug in one round must not end the service
                self.log.exception("The %s failed; trying again in %g s", what, interval_seconds)
            if once:
                return
            await asyncio.sleep(max(min_wait_seconds, interval_seconds - (time.monotonic() - began)))
