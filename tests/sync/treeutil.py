"""Workspaces for the sync tests: build one, and describe one to compare it with another."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

MiB = 1 << 20


def write(root: Path, rel: str, data: bytes | str, mtime_ns: int | None = None) -> Path:
    """Write a file (parents made); optionally set its mtime."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def big_file(path: Path, size: int, seed: str = "") -> Path:
    """A sparse file of ``size`` bytes with distinct content every 10 MiB (quick to make, not all zeros)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 10 * MiB):
            f.seek(offset)
            f.write(hashlib.sha256(f"{seed}{offset}".encode()).digest() * 64)
    return path


def sample_workspace(root: Path) -> None:
    """Nested folders, text, binary, unicode names, an empty folder, a link inside, an executable."""
    write(root, "notebooks/analysis.ipynb", '{"cells": []}')
    write(root, "notebooks/deep/er/still/notes.md", "# notes\n" * 100)
    write(root, "data/blob.bin", bytes(range(256)) * 1000)
    write(root, "données/résumé été ✓.txt", "unicode ✓ naïve")
    write(root, "日本語/ファイル.txt", "こんにちは")
    write(root, "spaces in name/a b.txt", "x")
    run = write(root, "bin/run.sh", "#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    (root / "empty" / "folder").mkdir(parents=True)
    os.symlink("notebooks/analysis.ipynb", root / "latest.ipynb")
    write(root, ".ipynb_checkpoints/analysis-checkpoint.ipynb", "checkpoint")
    write(root, "pkg/__pycache__/mod.cpython-311.pyc", b"\0pyc")


def describe(root: Path) -> dict[str, tuple]:
    """path -> ("file", sha256, mode, mtime_ns) | ("link", target) | ("dir",) for everything under root."""
    tree: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                tree[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                tree[rel] = ("dir",)
            else:
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    for chunk in iter(lambda: f.read(MiB), b""):
                        h.update(chunk)
                tree[rel] = ("file", h.hexdigest(), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return tree


def without(tree: dict[str, tuple], *names: str) -> dict[str, tuple]:
    """The tree without the entries at or below any of ``names``."""
    return {k: v for k, v in tree.items() if not any(k == n or k.startswith(n + "/") for n in names)}
