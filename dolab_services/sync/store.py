"""The storage interface every backup target implements (S3 in ``s3.py``, Google Drive in ``drive.py``).

The sync engine (``engine.py``) only ever talks to an :class:`ObjectStore`: a flat namespace of objects under one
user's root (the S3 prefix ``<prefix>/<user>/`` or the user's Drive folder), addressed by *keys*.

Keys
    Relative, ``/``-separated ASCII strings made only of ``[A-Za-z0-9._-]`` and ``/``: no leading or trailing
    ``/``, no empty segments, no ``.`` or ``..`` segment, at most 256 characters. The engine writes only these
    shapes (file names with unicode live *inside* snapshot manifests, never in keys)::

        blobs/<sha256[:2]>/<sha256>          file contents, content-addressed (immutable once written)
        snapshots/<YYYYmmddTHHMMSSffffffZ>.json.gz   one manifest per snapshot, written last

    A store may map keys onto its own layout (Drive: the key is a file's title in the user's folder) as long as
    :meth:`ObjectStore.list` gives the same keys back. :func:`check_key` validates a key.

Semantics every implementation keeps
    - ``put_*`` creates or **replaces** the object (never a second object with the same key).
    - After ``put_*`` returns, ``get_*`` and ``list`` see the object (read-after-write).
    - An object appears whole or not at all: a put that fails or is interrupted leaves no partial object under the
      key (S3 multipart uploads are aborted; Drive resumable uploads are simply not finished).
    - ``get_*`` of a missing key raises :class:`ObjectNotFound`; ``delete`` of a missing key is not an error.
    - Every method is synchronous and blocking, and may be called **concurrently from several threads** (the engine
      uploads in a bounded pool). An implementation whose client is not thread-safe keeps one per thread.
    - Every failure is raised as :class:`StoreError` (or a subclass) whose message is a sentence a user can read:
      what failed and what to do. The SDK's exception is chained (``raise StoreError(...) from e``) for the log.
      Messages never contain credentials, tokens or presigned URLs.
    - Calls are bounded in time by SDK-level timeouts/retries configured in the implementation.

The contract is exercised for any store by ``tests/sync/contract.py`` (``run_store_contract(store, tmp_path)``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["KEY_MAX_LENGTH", "ObjectInfo", "ObjectNotFound", "ObjectStore", "StoreError", "check_key", "iter_keys"]

#: The longest key the engine writes, and the longest every store must accept.
KEY_MAX_LENGTH = 256

_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


class StoreError(Exception):
    """A storage operation failed; ``str(error)`` is a sentence for the user (what failed, what to do)."""


class ObjectNotFound(StoreError):
    """The object asked for does not exist in the store."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object as :meth:`ObjectStore.list` reports it.

    ``key`` is relative to the store's root (see the module docstring); ``size`` is in bytes.
    """

    key: str
    size: int


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid store key (see the module docstring), else raise ValueError."""
    if not key or len(key) > KEY_MAX_LENGTH:
        raise ValueError(f"store key {key!r} must be 1 to {KEY_MAX_LENGTH} characters")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _KEY_SEGMENT.match(segment):
            raise ValueError(f"store key {key!r} must be /-separated segments of letters, digits, '.', '_' or '-'")
    return key


@runtime_checkable
class ObjectStore(Protocol):
    """A flat key -> bytes store under one user's root. Synchronous, thread-safe, see the module docstring.

    ``description`` names the target for messages and logs, without secrets (``s3://bucket/prefix/alice``,
    ``Google Drive folder DO-LAB backups/alice``).
    """

    description: str

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (plain string prefix, ``""`` for all), in any order.

        Handles the store's pagination internally; the iterator may be consumed lazily.
        """
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Upload the file at ``path`` as ``key``, streaming it (never read whole into memory).

        Large files use the store's chunked upload (S3 multipart, Drive resumable upload); an interrupted upload
        leaves nothing under ``key``.
        """
        ...

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` (small: manifests, markers) as ``key``."""
        ...

    def get_file(self, key: str, path: Path) -> None:
        """Download ``key`` into ``path`` (created or truncated; the parent exists), streaming it.

        The caller writes to a temporary path and renames it, so a failed download may leave ``path`` partial.
        Raises :class:`ObjectNotFound` when ``key`` does not exist.
        """
        ...

    def get_bytes(self, key: str) -> bytes:
        """The content of ``key`` (small objects only); :class:`ObjectNotFound` when it does not exist."""
        ...

    def delete(self, keys: Iterable[str]) -> None:
        """Delete these objects (batched internally); keys that do not exist are ignored."""
        ...

    def close(self) -> None:
        """Release clients and connections; the store is not used afterwards."""
        ...


def iter_keys(store: ObjectStore, prefix: str = "") -> Iterator[str]:
    """Just the keys of ``store.list(prefix)``."""
    return (info.key for info in store.list(prefix))
