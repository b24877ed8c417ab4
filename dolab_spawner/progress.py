"""Progress events for the spawn page: what ``start()`` emits, streamed by ``progress()`` as it happens.

JupyterHub runs ``progress()`` beside ``start()`` and may call it before ``start()`` has begun, so events are kept
in a list and a waiter is woken for each new one; the stream ends once the start has finished and every event has
been sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["ProgressEvents"]


class ProgressEvents:
    """A spawner mixin: :meth:`emit` records an event, :meth:`progress` streams them (the hub's contract)."""

    log: logging.Logger
    _log_name: str

    _events_changed: asyncio.Event | None = None
    _start_finished = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._events: list[dict[str, Any]] = []

    def _progress_reset(self) -> None:
        self._events = []
        self._events_changed = asyncio.Event()
        self._start_finished = False

    def emit(self, progress: int, message: str) -> None:
        """Record a progress event for the spawn page (``progress`` in 0-100)."""
        self.log.debug("%s: %s", self._log_name, message)
        self._events.append({"progress": progress, "message": message})
        if self._events_changed is not None:
            self._events_changed.set()

    def _progress_done(self) -> None:
        self._start_finished = True
        if self._events_changed is not None:
            self._events_changed.set()

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """Each phase of the start as it happens; may be called before ``start()`` has begun."""
        sent = 0
        while True:
            while sent < len(self._events):
                yield self._events[sent]
                sent += 1
            if self._start_finished and self._events_changed is not None:
                return
            if self._events_changed is None:
                await asyncio.sleep(0.1)
                continue
            self._events_changed.clear()
            try:
                await asyncio.wait_for(self._events_changed.wait(), timeout=1)
            except asyncio.TimeoutError:
                pass
