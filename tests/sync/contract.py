"""The ObjectStore contract (dolab_services/sync/store.py), checked against any store: ``run_store_contract(store)``.

The store must be empty (a fresh user root). Every target's tests call it (S3 here; Drive in test_drive_store.py).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dolab_services.sync.store import ObjectNotFound, ObjectStore, StoreError


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_store_contract(store: ObjectStore, tmp_path: Path, large_bytes: int = 20 << 20) -> None:
    """Put, get, list, replace, delete, missing keys, key checks, concurrency, a large (chunked) upload."""
    assert isinstance(store, ObjectStore)
    assert store.description and isinstance(store.description, str)
    assert list(store.list()) == []

    store.put_bytes("snapshots/one.json.gz", b"first")
    assert store.get_bytes("snapshots/one.json.gz") == b"first"
    store.put_bytes("snapshots/one.json.gz", b"second, longer")  # replaces, never a second object
    assert store.get_bytes("snapshots/one.json.gz") == b"second, longer"
    assert [(i.key, i.size) for i in store.list("snapshots/")] == [("snapshots/one.json.gz", 14)]

    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(1000))
    large = tmp_path / "large.bin"
    with open(large, "wb") as f:
        for _ in range(large_bytes >> 20):
            f.write(os.urandom(1 << 20))
    store.put_file("blobs/aa/small", small)
    store.put_file("blobs/bb/large", large)
    got = tmp_path / "got.bin"
    store.get_file("blobs/bb/large", got)
    assert _sha(got) == _sha(large)
    store.get_file("blobs/aa/small", got)  # truncates what was there
    assert got.read_bytes() == small.read_bytes()
    listed = {i.key: i.size for i in store.list("blobs/")}
    assert listed == {"blobs/aa/small": 1000, "blobs/bb/large": large.stat().st_size}
    assert {i.key for i in store.list("blobs/a")} == {"blobs/aa/small"}
    assert {i.key for i in store.list()} == {"snapshots/one.json.gz", "blobs/aa/small", "blobs/bb/large"}

    with pytest.raises(ObjectNotFound):
        store.get_bytes("snapshots/missing.json.gz")
    with pytest.raises(ObjectNotFound):
        store.get_file("blobs/cc/missing", got)
    assert issubclass(ObjectNotFound, StoreError)

    for bad in ("../other-user/x", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"x")

    # Many threads at once (the engine uploads in a pool).
    def put(i: int) -> None:
        store.put_bytes(f"blobs/pp/{i:03d}", str(i).encode())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(40)))
    assert len([i for i in store.list("blobs/pp/")]) == 40
    assert store.get_bytes("blobs/pp/007") == b"7"

    store.delete([f"blobs/pp/{i:03d}" for i in range(40)] + ["blobs/never/existed"])
    assert list(store.list("blobs/pp/")) == []
    store.delete(["blobs/aa/small", "blobs/bb/large", "snapshots/one.json.gz"])
    assert list(store.list()) == []
