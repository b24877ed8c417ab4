"""DO-LAB's hub side: DoLabSpawner, its profiles, GPU slots and backends.

``DoLabSpawner`` is imported on first use, so ``dolab_spawner.profiles`` (or the ``dolab`` command) can be
imported without loading JupyterHub's spawner and every backend's SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spawner import DoLabSpawner

__all__ = ["DoLabSpawner", "__version__"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "DoLabSpawner":
        from .spawner import DoLabSpawner

        return DoLabSpawner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
