"""What both ``dolab`` commands share: the error users see, a timeout around blocking calls, URL masking, the
plain-text table, and the static GPU inventory as the shipped config reads it.

Everything that can block (NVML, the docker socket, the proxy, the database, HTTP) runs under
:func:`run_with_timeout`: the doctor is what one runs when something hangs.
"""

from __future__ import annotations

import re
import textwrap
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar
from urllib.parse import unquote

from dolab_core.gpus import GpuSlot, inventory_from_config
from dolab_core.hubconfig import ConfigEnvError, env_json

__all__ = [
    "DEFAULT_HUB_URL",
    "CliError",
    "default_hub_url",
    "format_table",
    "mask_url",
    "run_with_timeout",
    "static_inventory",
]

DEFAULT_HUB_URL = "http://127.0.0.1:8000"

T = TypeVar("T")


class CliError(Exception):
    """A failure the user can act on: its message is one sentence, printed without a traceback."""


def run_with_timeout(fn: Callable[[], T], timeout_seconds: float) -> T:
    """``fn()`` in a daemon thread; :class:`TimeoutError` when it has not returned in time.

    A hung driver or socket call cannot be interrupted, only abandoned: a daemon thread does not keep the
    command from exiting (a ``ThreadPoolExecutor`` worker would).
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=target, name="dolab-check", daemon=True)
    thread.start()
    thread.join(timeout_seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer in {timeout_seconds:g} s")
    if error:
        raise error[0]
    return result[0]


def _short(error: BaseException | str, limit: int = 160) -> str:
    """The first line of an error, cut to ``limit`` characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _http_reason(error: BaseException) -> str:
    """``Connection refused`` rather than requests' three-line pool message."""
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(error))
    return match.group(1).strip() if match else _short(error, 80)


def _split_userinfo(url: str) -> tuple[str, str, str, str] | None:
    """``(scheme, user, password, rest)`` of ``scheme://user:password@rest``; None without a password."""
    scheme, sep, remainder = url.partition("://")
    if not sep:
        return None
    head, question, query = remainder.partition("?")
    userinfo, at, host = head.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon:
        return None
    return scheme, user, password, host + question + query


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, so it can be printed."""
    parts = _split_userinfo(url)
    if parts is None:
        return url
    scheme, user, _, rest = parts
    return f"{scheme}://{user}:***@{rest}"


def _scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message) without the password of ``url``, raw or percent-decoded."""
    parts = _split_userinfo(url)
    if parts is None or not parts[2]:
        return text
    for secret in {parts[2], unquote(parts[2])}:
        text = text.replace(secret, "***")
    return text


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]], wrap_at: int = 0) -> str:
    """A plain-text table: a header, a rule, one row per entry, columns padded to their widest cell.

    Cells longer than ``wrap_at`` characters (0: never) are wrapped onto extra lines within their column.
    """

    def lines(cell: object) -> list[str]:
        text = str(cell)
        if wrap_at and len(text) > wrap_at:
            return textwrap.wrap(text, wrap_at, break_on_hyphens=False) or [""]
        return text.splitlines() or [""]

    table = [[lines(h) for h in headers]]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells, the table {len(headers)} columns: {row!r}")
        table.append([lines(c) for c in row])
    widths = [max(len(line) for row in table for line in row[col]) for col in range(len(headers))]
    out = []
    for number, row in enumerate(table):
        for i in range(max(len(cell) for cell in row)):
            texts = [(cell[i] if i < len(cell) else "").ljust(width) for cell, width in zip(row, widths, strict=True)]
            out.append("  ".join(texts).rstrip())
        if number == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def static_inventory(env: Mapping[str, str]) -> list[GpuSlot] | None:
    """The GPUs in ``DOLAB_GPU_INVENTORY`` (or its ``_FILE``), as the shipped config reads them; None if unset.

    Raises ValueError with a sentence naming the variable when it is set but unusable.
    """
    try:
        entries = env_json(env, "DOLAB_GPU_INVENTORY")
        return None if entries is None else inventory_from_config(entries)
    except ConfigEnvError:
        raise
    except (ValueError, TypeError) as e:
        raise ValueError(f"DOLAB_GPU_INVENTORY is not a list of GPUs the hub can use: {e}") from None


def default_hub_url(env: Mapping[str, str]) -> str:
    """Where the hub listens when ``--url`` is not given: ``$DOLAB_HUB_URL``, else ``$DOLAB_BIND_URL`` (where
    the shipped ``jupyterhub_config.py`` binds it), else :data:`DEFAULT_HUB_URL`.
    """
    return env.get("DOLAB_HUB_URL") or env.get("DOLAB_BIND_URL") or DEFAULT_HUB_URL
