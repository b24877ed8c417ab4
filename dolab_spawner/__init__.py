"""DO-LAB's hub side: DoLabSpawner, its profiles, GPU slots and backends."""

from .spawner import DoLabSpawner

__all__ = ["DoLabSpawner", "__version__"]

__version__ = "0.1.0"
