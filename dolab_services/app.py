"""What every DO-LAB hub-managed service application shares."""

from __future__ import annotations

import logging

from traitlets import default
from traitlets.config import Application

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
