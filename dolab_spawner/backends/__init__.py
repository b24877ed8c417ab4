"""Backends: where a server runs. DoLabSpawner picks one per profile (``backend: local``).

Each backend is one module with a :class:`~.base.Backend` subclass, named in :data:`BACKENDS`. A backend is
imported on first use, so a hub whose profiles are all local never loads docker-py, dockerspawner, paramiko or
the RunPod SDK. To add one: write ``backends/<name>.py`` (a ``Backend`` mixed into a JupyterHub Spawner, see
:class:`~.base.Backend` for what to implement) and add ``"<name>": "dolab_spawner.backends.<name>:<Class>"``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from dolab_core.hooks import load_object

if TYPE_CHECKING:
    from .base import Backend

__all__ = ["BACKENDS", "backend_class"]

#: Backend name (a profile's ``backend``) -> ``module:Class`` of the Spawner that runs it.
BACKENDS: dict[str, str] = {
    "local": "dolab_spawner.backends.local:LocalProcessBackend",
    "docker": "dolab_spawner.backends.docker:DockerBackend",
    "runpod": "dolab_spawner.backends.runpod:RunPodBackend",
}


@functools.cache
def backend_class(name: str) -> type[Backend]:
    """The class for a backend name, imported on first use; profile validation has already refused unknown names."""
    found = load_object(BACKENDS[name], what="backend", kind="class", malformed="must be written module.path:Class")
    return found  # type: ignore[return-value]
