"""Backends: where a server runs. DoLabSpawner picks one per profile (``backend: local``)."""

from __future__ import annotations

from .base import BackendMixin, gpu_environment, make_backend
from .docker import DockerBackend
from .local import LocalProcessBackend
from .runpod import RunPodBackend

__all__ = [
    "BACKENDS",
    "BackendMixin",
    "DockerBackend",
    "LocalProcessBackend",
    "RunPodBackend",
    "backend_class",
    "gpu_environment",
    "make_backend",
]

#: Backend name (a profile's ``backend``) -> the Spawner class that runs it.
BACKENDS: dict[str, type[BackendMixin]] = {
    "local": LocalProcessBackend,
    "docker": DockerBackend,
    "runpod": RunPodBackend,
}


def backend_class(name: str) -> type[BackendMixin]:
    """The class for a backend name; profile validation has already refused unknown names."""
    return BACKENDS[name]
