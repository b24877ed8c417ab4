"""Snapshot manifests (what a backup holds) and the local hash cache (what need not be read again).

A manifest is one gzipped JSON object per snapshot, stored as ``snapshots/<id>.json.gz``::

    {"format": "dolab-sync", "version": 1, "snapshot": "20261126T083000123456Z", "created": "2026-11-26T08:30:00Z",
     "files": [{"path": "notes/a.ipynb", "size": 1234, "mtime_ns": 1764145800000000000, "mode": 420,
                "sha256": "<hex>"}, ...],
     "links": [{"path": "latest", "target": "runs/42"}], "dirs": ["empty/folder"],
     "dir_modes": {"empty": 493, "empty/folder": 448, "notes": 493}}

``dirs`` lists the empty folders; ``dir_modes`` every folder's mode bits (permissions, setgid, sticky), so a 0700
``.ssh`` comes back 0700. Manifests written before ``dir_modes`` existed have none: their folders are restored
0755, as they always were. The format stays version 1: every addition is an optional field an older reader skips.
Names are JSON strings; a name that is not valid UTF-8 is kept as its bytes, in Python's surrogate-escape form
(``os.fsdecode``), which JSON writes as ``\\udcXX`` escapes (the JSON text itself is ASCII); a surrogate that is no
such byte escape is refused on read, so no escape can smuggle a ``/`` or a NUL into a name.

File contents are the blobs ``blobs/<sha256[:2]>/<sha256>``; a file from 32 MiB on is stored as 8 MiB pieces, each
a blob, listed in order in its entry's ``chunks``. Paths are relative and checked on read, so a
tampered manifest cannot make a restore write outside its destination; links that would lead outside, by their
text or through the manifest's other links, are refused (the first: the manifest is damaged) or dropped (the
second: snapshots made before that rule may hold them) on read.

The hash cache is local to the machine that syncs (``<cache dir>/<user>.json.gz``): per path, ``(size, mtime_ns,
ctime_ns, inode, sha256)``. A file whose four identity fields all match is not read again. The ctime is the key
to zero missed changes: it moves on every write and every ``utime`` (``cp -p``, ``tar x``) and no user can set it
back, so a same-size rewrite with the old mtime, or a file restored with an older timestamp, is always hashed again.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .store import StoreError
from .workspace import DIR_MODE_BITS, LinkEntry, UnsafePath, check_relpath, leaving_links, link_stays_inside

__all__ = [
    "BLOB_PREFIX",
    "CHUNK_BYTES",
    "CHUNK_THRESHOLD_BYTES",
    "SNAPSHOT_PREFIX",
    "CacheEntry",
    "FileRecord",
    "HashCache",
    "Manifest",
    "blob_key",
    "new_snapshot_id",
    "snapshot_id_of",
    "snapshot_key",
]

log = logging.getLogger("dolab.sync")

BLOB_PREFIX = "blobs/"
SNAPSHOT_PREFIX = "snapshots/"
_SNAPSHOT_SUFFIX = ".json.gz"
_FORMAT = "dolab-sync"
#: Files from CHUNK_THRESHOLD_BYTES on are stored in pieces of CHUNK_BYTES, so a change inside a large file uploads
#: only the pieces it touched.
CHUNK_BYTES = 8 << 20
CHUNK_THRESHOLD_BYTES = 32 << 20


def blob_key(sha256: str) -> str:
    """Where the content with this hash is stored."""
    return f"{BLOB_PREFIX}{sha256[:2]}/{sha256}"


def snapshot_key(snapshot_id: str) -> str:
    """Where the manifest of a snapshot is stored."""
    return f"{SNAPSHOT_PREFIX}{snapshot_id}{_SNAPSHOT_SUFFIX}"


def snapshot_id_of(key: str) -> str | None:
    """The snapshot id of a manifest key, or None for any other key."""
    if key.startswith(SNAPSHOT_PREFIX) and key.endswith(_SNAPSHOT_SUFFIX):
        sid = key[len(SNAPSHOT_PREFIX) : -len(_SNAPSHOT_SUFFIX)]
        if sid and "/" not in sid:
            return sid
    return None


def new_snapshot_id(now: datetime | None = None) -> str:
    """A sortable UTC id: ``YYYYmmddTHHMMSSffffffZ``."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S%fZ")


def snapshot_time(snapshot_id: str) -> datetime | None:
    """When a snapshot was taken, from its id."""
    try:
        return datetime.strptime(snapshot_id, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


@dataclass(frozen=True)
class FileRecord:
    """One file of a snapshot. ``sha256`` is the whole content's hash; a large file is stored as pieces of
    :data:`CHUNK_BYTES` whose hashes ``chunks`` lists in order (empty: one blob, ``sha256``)."""

    path: str
    size: int
    mtime_ns: int
    mode: int
    sha256: str
    chunks: tuple[str, ...] = ()

    @property
    def blobs(self) -> tuple[str, ...]:
        """The hashes of the blobs that hold this file's content."""
        return self.chunks or (self.sha256,)


@dataclass
class Manifest:
    """The content of one snapshot: files, links, empty folders (``dirs``) and every folder's mode
    (``dir_modes``, path -> mode bits; empty for a snapshot made before they were recorded)."""

    snapshot: str
    files: list[FileRecord] = field(default_factory=list)
    links: list[LinkEntry] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    dir_modes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """The sum of the file sizes."""
        return sum(f.size for f in self.files)

    def same_content(self, other: Manifest | None) -> bool:
        """Whether two snapshots hold the same tree (names, contents, modes, times)."""
        return (
            other is not None
            and self.files == other.files
            and self.links == other.links
            and sorted(self.dirs) == sorted(other.dirs)
            and self.dir_modes == other.dir_modes
        )

    def to_bytes(self) -> bytes:
        """The gzipped JSON stored as the snapshot's manifest."""
        created = snapshot_time(self.snapshot)
        doc = {
            "format": _FORMAT,
            "version": 1,
            "snapshot": self.snapshot,
            "created": created.isoformat().replace("+00:00", "Z") if created else "",
            "files": [_file_json(f) for f in self.files],
            "links": [asdict(link) for link in self.links],
            "dirs": list(self.dirs),
            "dir_modes": dict(sorted(self.dir_modes.items())),
        }
        # ASCII JSON: a name that is not UTF-8 (surrogate escapes) is written as \udcXX, which UTF-8 cannot hold.
        return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), compresslevel=6)

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and check a stored manifest; StoreError with a sentence when it is damaged or unsafe."""
        try:
            doc = json.loads(gzip.decompress(data))
            if doc.get("format") != _FORMAT or doc.get("version") != 1:
                raise ValueError("unknown format")
            files = [FileRecord(**_fields(f, FileRecord)) for f in doc["files"]]
            links = [LinkEntry(str(x["path"]), str(x["target"])) for x in doc.get("links", [])]
            dirs = [str(d) for d in doc.get("dirs", [])]
            raw_modes = doc.get("dir_modes", {})
            if not isinstance(raw_modes, dict):
                raise ValueError("dir_modes must be an object")
            dir_modes = {str(d): int(m) & DIR_MODE_BITS for d, m in raw_modes.items()}
            for f in files:
                check_relpath(f.path)
                if not all(_is_hash(h) for h in (f.sha256, *f.chunks)):
                    raise ValueError(f"bad hash for {f.path!r}")
                if f.chunks and len(f.chunks) != -(-f.size // CHUNK_BYTES):
                    raise ValueError(f"{f.path!r} has {len(f.chunks)} pieces for {f.size} bytes")
            for link in links:
                check_relpath(link.path)
                if not link_stays_inside(link.path, link.target):
                    raise UnsafePath(f"link {link.path!r} leads out of the workspace")
                os.fsencode(link.target)  # a surrogate that is no byte escape: damaged
            for d in [*dirs, *dir_modes]:
                check_relpath(d)
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            raise StoreError(f"A backup manifest is damaged ({e}); pick another restore point.") from e
        leaving = leaving_links({link.path: link.target for link in links})
        if leaving:
            log.warning(
                "Snapshot %s: %d link(s) lead out of the workspace through other links and are not restored: %s",
                doc["snapshot"],
                len(leaving),
                ", ".join(repr(p) for p in sorted(leaving)[:10]),
            )
            links = [link for link in links if link.path not in leaving]
        return cls(str(doc["snapshot"]), files, links, dirs, dir_modes)


def _is_hash(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _file_json(f: FileRecord) -> dict[str, Any]:
    doc = asdict(f)
    if f.chunks:
        doc["chunks"] = list(f.chunks)
    else:
        del doc["chunks"]
    return doc


def _fields(raw: Any, cls: type) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError("a file entry is not an object")
    chunks = raw.get("chunks", [])
    if not isinstance(chunks, list):
        raise ValueError("chunks must be a list")
    return {
        "path": str(raw["path"]),
        "size": int(raw["size"]),
        "mtime_ns": int(raw["mtime_ns"]),
        "mode": int(raw["mode"]) & 0o777,
        "sha256": str(raw["sha256"]),
        "chunks": tuple(str(c) for c in chunks),
    }


#: A hash cache entry: size, mtime_ns, ctime_ns, inode, sha256 (ctime and inode 0 where a side cannot see them).
CacheEntry = tuple[int, int, int, int, str]


class HashCache:
    """path -> (size, mtime_ns, ctime_ns, inode, sha256), kept in a local file between syncs."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, CacheEntry] = {}
        if path is not None:
            try:
                doc = json.loads(gzip.decompress(path.read_bytes()))
                self.entries = {k: tuple(v) for k, v in doc.get("entries", {}).items()}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, EOFError):
                self.entries = {}  # a damaged cache only costs hashing again

    def lookup(self, path: str, size: int, mtime_ns: int, ctime_ns: int, ino: int) -> str | None:
        """The hash of an unchanged file, or None when it must be read."""
        hit = self.entries.get(path)
        if hit is not None and hit[:4] == (size, mtime_ns, ctime_ns, ino):
            return hit[4]
        return None

    def save(self, entries: dict[str, CacheEntry]) -> None:
        """Replace the cache with ``entries`` (written atomically)."""
        self.entries = entries
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = gzip.compress(json.dumps({"version": 1, "entries": entries}).encode(), compresslevel=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cache-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
