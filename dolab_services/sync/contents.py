"""A client of a running Jupyter server's contents REST API: :class:`RemoteServer` lists, reads and writes the
files of a workspace that lives in that server (a RunPod pod), for :mod:`.remote`'s backups and restores.

What the API can and cannot see
    - :meth:`RemoteServer.scan` applies the local scan's excludes, size cap and path checks; every path the server
      reports is checked (relative, no ``..``, its name inside its folder), and a tree deeper than ``max_depth`` is
      cut (a symlink loop).
    - jupyter-server hides hidden files (``.name``) and a few globs (``*.pyc``, ``*.so``, ``*~``...) from listings
      unless it runs with ``ContentsManager.allow_hidden``; those are not seen. Symlinks are followed by the
      server: a link inside the workspace reads as a copy, one leading out is refused by ``files/`` (403). File
      modes are not visible: files are reported 0644 (0444 when not writable).
    - Files are written with ``PUT api/contents/<path>`` (base64, in ``chunk`` 1..n, -1 for the last, above
      ``chunk_bytes``); times and modes cannot be set through the API, and symlinks cannot be made.

What the server says is not trusted
    The server is its user's (root in a pod): a listing is read up to ``max_listing_bytes`` and ``max_entries``
    entries in all, a download stops at the size the listing gave (:class:`Oversized`), and one client reads at most
    ``max_read_bytes`` from the server (``DOLAB_SYNC_MAX_REMOTE_GB``): past that it fails with a sentence, before the
    hub's disk or bandwidth pay for it.

Every request carries ``no_track_activity=1`` (jupyter-server then does not count it as the user's activity) and
goes to the server's own address, never through the hub's proxy (which would). Redirects are never followed (a
redirect would carry the token elsewhere). All of this is blocking (``requests``): callers run it on a thread pool.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import requests
from urllib3.exceptions import HTTPError as Urllib3Error

from .store import StoreError
from .workspace import Excludes, UnsafePath, check_relpath

__all__ = [
    "MAX_ENTRIES",
    "MAX_LISTING_BYTES",
    "MAX_READ_BYTES",
    "AccessRefused",
    "Oversized",
    "PathRefused",
    "RemoteError",
    "RemoteFile",
    "RemoteServer",
    "RemoteTree",
    "parse_time_ns",
]

log = logging.getLogger("dolab.sync")

_READ_CHUNK = 1 << 20
#: One folder's listing may weigh this much (about 100,000 entries).
MAX_LISTING_BYTES = 32 << 20
#: Entries (files and folders) a whole workspace may list.
MAX_ENTRIES = 1_000_000
#: What one backup may read from a server in all, unless the admin sets DOLAB_SYNC_MAX_REMOTE_GB.
MAX_READ_BYTES = 200 << 30
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class RemoteError(StoreError):
    """The user's server could not be read or written; ``str(error)`` is a sentence."""


class AccessRefused(RemoteError):
    """The server refused the token (401 or 403): waiting or retrying will not help."""


class PathRefused(RemoteError):
    """The server refused one path (4xx): that path is skipped, the rest goes on (``str(error)``: ``HTTP 4xx``)."""


class Oversized(RemoteError):
    """The server sent more of a file than its listing said: that file is skipped."""


@dataclass(frozen=True)
class RemoteFile:
    """A file as the server's listing reports it (``mtime_ns`` has microsecond precision)."""

    path: str
    size: int
    mtime_ns: int
    mode: int


@dataclass
class RemoteTree:
    """A listing of the whole workspace: files, empty folders, what was skipped (path, why)."""

    files: list[RemoteFile] = field(default_factory=list)
    empty_dirs: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def parse_time_ns(value: Any) -> int:
    """``last_modified`` (ISO 8601, as jupyter-server writes it) as nanoseconds since the epoch; 0 when unknown."""
    if not isinstance(value, str) or not value:
        return 0
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    delta = when - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


class RemoteServer:
    """The contents of one running Jupyter server, through its REST API.

    ``url`` is the server's own address with its base URL (``http://10.0.0.5:8888/user/alice/``, the spawner
    state's ``server_url``); ``token`` a token the server accepts for that server only (the hub's per-server token,
    or a service token with ``access:servers``). Thread-safe: one ``requests`` session per thread.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_seconds: float = 60,
        chunk_bytes: int = 8 << 20,
        max_depth: int = 64,
        max_listing_bytes: int = MAX_LISTING_BYTES,
        max_entries: int = MAX_ENTRIES,
        max_read_bytes: int = MAX_READ_BYTES,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not a server URL: {url!r}")
        self.url = url.rstrip("/") + "/"
        self._token = token
        self.timeout_seconds = timeout_seconds
        self.chunk_bytes = max(1024, chunk_bytes - chunk_bytes % 3)  # base64 of each chunk stands alone
        self.max_depth = max_depth
        self.max_listing_bytes = max_listing_bytes
        self.max_entries = max_entries
        self.max_read_bytes = max_read_bytes
        self._entries = 0  # listed so far (scan)
        self._read = 0  # bytes downloaded so far
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the token
        return f"RemoteServer({self.url!r})"

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["Authorization"] = f"token {self._token}"
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        """Close every connection."""
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def _call(self, method: str, endpoint: str, path: str, doing: str, **kwargs: Any) -> requests.Response:
        url = self.url + endpoint + quote(path, safe="/")
        params = {"no_track_activity": "1", **kwargs.pop("params", {})}
        try:
            reply = self._session().request(
                method,
                url,
                params=params,
                timeout=(min(10.0, self.timeout_seconds), self.timeout_seconds),
                allow_redirects=False,
                **kwargs,
            )
        except requests.Timeout:
            raise RemoteError(f"Your server did not answer in {self.timeout_seconds:g} s while {doing}.") from None
        except requests.RequestException as e:
            raise RemoteError(f"Your server could not be reached while {doing} ({type(e).__name__}).") from e
        if reply.status_code == 401 or (reply.status_code == 403 and not path):
            reply.close()
            raise AccessRefused(f"Your server refused the hub's access while {doing} (HTTP {reply.status_code}).")
        if 300 <= reply.status_code < 400:
            reply.close()
            raise RemoteError(f"Your server answered a redirect while {doing}; it is not reachable at {self.url}.")
        if 400 <= reply.status_code < 500:
            reply.close()
            raise PathRefused(f"HTTP {reply.status_code}")
        if reply.status_code >= 500:
            reply.close()
            raise RemoteError(f"Your server failed while {doing} (HTTP {reply.status_code}).")
        return reply

    def wait_ready(self, timeout_seconds: float) -> None:
        """Wait until the contents API answers (a server still starting); RemoteError after ``timeout_seconds``."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                self._call("GET", "api/contents", "", "checking that it runs", params={"content": "0"}).close()
                return
            except AccessRefused:
                raise
            except (RemoteError, PathRefused):
                if time.monotonic() >= deadline:
                    raise RemoteError(f"Your server did not answer within {timeout_seconds:g} s.") from None
            time.sleep(0.5)

    # ----- reading -------------------------------------------------------------------------------------

    def list_dir(self, path: str) -> list[dict[str, Any]]:
        """The entries of the folder ``path`` ("" for the root) as the contents API lists them."""
        doing = f"listing {path or 'your workspace'}"
        try:
            reply = self._call("GET", "api/contents/", path, doing, params={"content": "1"}, stream=True)
        except PathRefused as e:
            if path:
                raise
            raise RemoteError(f"Your server answered {e} while {doing}; is its address right?") from None
        try:
            body = reply.raw.read(self.max_listing_bytes + 1, decode_content=True)
        except (OSError, Urllib3Error) as e:  # a broken or too slow answer
            raise RemoteError(f"Your server's answer broke off while {doing} ({type(e).__name__}).") from e
        finally:
            reply.close()
        if len(body) > self.max_listing_bytes:
            raise RemoteError(
                f"Your server's listing of {path or 'your workspace'} is larger than "
                f"{self.max_listing_bytes >> 20} MiB; split such folders, or exclude them from backups."
            )
        try:
            model = json.loads(body)
        except ValueError:
            raise RemoteError("Your server's contents API did not answer JSON.") from None
        if (
            not isinstance(model, dict)
            or model.get("type") != "directory"
            or not isinstance(model.get("content"), list)
        ):
            raise RemoteError(f"Your server's contents API did not list the folder {path or '/'}.")
        return [e for e in model["content"] if isinstance(e, dict)]

    def scan(self, excludes: Excludes | None = None) -> RemoteTree:
        """List the whole workspace, with the local scan's excludes, size cap and path checks."""
        tree = RemoteTree()
        self._entries = 0
        self._scan_dir("", 0, excludes or Excludes(), tree)
        tree.files.sort(key=lambda f: f.path)
        return tree

    def _scan_dir(self, prefix: str, depth: int, excludes: Excludes, tree: RemoteTree) -> bool:
        """Scan one folder; whether it held anything kept."""
        if depth > self.max_depth:
            tree.skipped.append((prefix + "/", f"deeper than {self.max_depth} folders (a symlink loop?)"))
            return True
        try:
            entries = self.list_dir(prefix)
        except PathRefused as e:
            tree.skipped.append((prefix + "/", f"the server refused to list it ({e})"))
            log.warning("Sync skips the remote folder %s: the server refused to list it (%s)", prefix, e)
            return True
        self._entries += len(entries)
        if self._entries > self.max_entries:
            raise RemoteError(
                f"Your workspace lists more than {self.max_entries:,} files and folders, more than a backup reads; "
                "exclude some folders from backups."
            )
        kept = False
        for entry in entries:
            name, kind = entry.get("name"), entry.get("type")
            path = f"{prefix}/{name}" if prefix else str(name)
            try:
                if not isinstance(name, str) or "/" in name:
                    raise UnsafePath(f"{name!r} is not a file name")
                check_relpath(path)
                if entry.get("path") is not None and str(entry["path"]).strip("/") != path:
                    raise UnsafePath(f"the server reports it as {entry['path']!r}")
            except UnsafePath as e:
                tree.skipped.append((path, f"refused: {e}"))
                log.warning("Sync refuses the remote path %r: %s", path, e)
                continue
            if excludes.excluded(path, name):
                continue
            if kind == "directory":
                if self._scan_dir(path, depth + 1, excludes, tree):
                    kept = True
                else:
                    tree.empty_dirs.append(path)
                    kept = True
            elif kind in ("file", "notebook"):
                size = entry.get("size")
                if not isinstance(size, int) or size < 0:
                    tree.skipped.append((path, "the server does not say its size"))
                    continue
                if excludes.max_file_bytes and size > excludes.max_file_bytes:
                    tree.skipped.append((path, f"{size} bytes is over the {excludes.max_file_bytes}-byte cap"))
                    continue
                mode = 0o644 if entry.get("writable", True) else 0o444
                tree.files.append(RemoteFile(path, size, parse_time_ns(entry.get("last_modified")), mode))
                kept = True
            else:
                tree.skipped.append((path, f"not a file or folder ({kind})"))
        return kept

    def is_empty(self, excludes: Excludes | None = None) -> bool:
        """Whether the workspace holds no file (but excluded ones): a new pod's workspace, maybe with the empty
        folders its image made. Stops listing at the first file found."""
        excludes = excludes or Excludes()
        folders = [("", 0)]
        listed = 0
        while folders:
            folder, depth = folders.pop()
            entries = self.list_dir(folder)
            listed += len(entries)
            if listed > self.max_entries:
                raise RemoteError(f"Your workspace lists more than {self.max_entries:,} folders.")
            for entry in entries:
                name = entry.get("name")
                if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
                    continue
                path = f"{folder}/{name}" if folder else name
                if excludes.excluded(path, name):
                    continue
                if entry.get("type") != "directory":
                    return False
                if depth < self.max_depth:
                    folders.append((path, depth + 1))
        return True

    def download(self, path: str, fd: int, max_bytes: int) -> int:
        """Stream the file ``path`` (``files/``) into the descriptor ``fd`` from offset 0; the bytes written.

        Reads at most ``max_bytes`` (the size the listing gave): :class:`Oversized` when the server sends more.
        Raises FileNotFoundError when it is gone, :class:`PathRefused` when the server will not serve it, and
        :class:`RemoteError` once this server has sent ``max_read_bytes`` in all.
        """
        try:
            reply = self._call("GET", "files/", path, f"reading {path}", stream=True)
        except PathRefused as e:
            if str(e) == "HTTP 404":
                raise FileNotFoundError(path) from None
            raise
        written = 0
        try:
            for data in reply.iter_content(_READ_CHUNK):
                if written + len(data) > max_bytes:
                    raise Oversized(f"the server sent more than the {max_bytes} bytes it listed")
                self._count_read(len(data))
                os.pwrite(fd, data, written)
                written += len(data)
        except requests.RequestException as e:
            raise RemoteError(f"Reading {path} from your server was interrupted ({type(e).__name__}).") from e
        finally:
            reply.close()
        os.ftruncate(fd, written)
        return written

    def _count_read(self, size: int) -> None:
        with self._lock:
            self._read += size
            over = self._read > self.max_read_bytes
        if over:
            raise RemoteError(
                f"Your server sent more than {self.max_read_bytes / (1 << 30):g} GiB in one backup, more than a backup "
                "may read; exclude large folders from backups, or ask an administrator."
            )

    # ----- writing -------------------------------------------------------------------------------------

    def make_dir(self, path: str) -> None:
        """Create the folder ``path`` (its parent exists); an existing folder is fine."""
        check_relpath(path)
        self._call("PUT", "api/contents/", path, f"creating the folder {path}", json={"type": "directory"}).close()

    def upload(self, path: str, fd: int, size: int) -> dict[str, Any]:
        """Write the file ``path`` from ``fd`` (``size`` bytes), in chunks above ``chunk_bytes``; the server's model
        of the written file (``size``, ``last_modified``)."""
        check_relpath(path)
        doing = f"writing {path}"
        if size <= self.chunk_bytes:
            body: dict[str, Any] = {"type": "file", "format": "base64"}
            body["content"] = base64.b64encode(os.pread(fd, size, 0)).decode()
            reply = self._call("PUT", "api/contents/", path, doing, json=body)
            return _model(reply)
        offset, number = 0, 1
        while True:
            data = os.pread(fd, self.chunk_bytes, offset)
            offset += len(data)
            last = offset >= size or not data
            body = {
                "type": "file",
                "format": "base64",
                "chunk": -1 if last else number,
                "content": base64.b64encode(data).decode(),
            }
            reply = self._call("PUT", "api/contents/", path, doing, json=body)
            if last:
                return _model(reply)
            reply.close()
            number += 1


def _model(reply: requests.Response) -> dict[str, Any]:
    try:
        model = reply.json()
    except ValueError:
        model = {}
    finally:
        reply.close()
    return model if isinstance(model, dict) else {}
