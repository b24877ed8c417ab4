"""Find the object a ``module.path:name`` setting names: spawner and pre-stop hooks, GPU telemetry sources.

One helper for every setting of that form, so they accept and refuse the same strings; each caller keeps its own
words (``what`` it loads and the ``kind`` of object it wants) in the sentences users read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["load_hook", "load_object"]


def load_object(spec: str, *, what: str, kind: str, malformed: str) -> Callable[..., Any]:
    """The callable that ``spec`` (``module.path:name``) names.

    Raises ValueError with a sentence starting with ``what`` and the spec: ``malformed`` when the spec is not of
    that form (``name`` must be an identifier), "cannot import ..." when the module does not import, "MODULE has no
    ``kind`` NAME" when it has no such callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise ValueError(f"{what} {spec!r} {malformed}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name} ({e})") from e
    found = getattr(module, attr, None)
    if not callable(found):
        raise ValueError(f"{what} {spec!r}: {module_name} has no {kind} {attr}")
    return found


def load_hook(hook: Any) -> Callable[..., Any]:
    """A hook setting's callable: the hook itself, or what its ``module.path:name`` string names (ValueError)."""
    if callable(hook):
        return hook
    return load_object(str(hook), what="hook", kind="callable", malformed="must be written module.path:callable")
