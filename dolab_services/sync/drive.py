"""Google Drive backup target: :class:`DriveStore`, an :class:`~.store.ObjectStore` on pydrive2.

Layout
    One folder per user, named after the user, inside a root folder: the configured ``folder_id``, or the folder
    called ``folder_name`` (default ``DO-LAB backups``) in the account's My Drive. Both are found by name and
    created on first use; if a race ever made two, the oldest is used. Store keys are **flat titles** in the user's
    folder (``blobs/ab/ab12...`` is one file with that title): one ``files.list`` query finds any key, a listing is
    one paginated query, and no per-segment folders have to be created or looked up.

Authentication
    :mod:`.drive_auth`: a service account's key (backups in that account's Drive, one folder per user) or a user's
    own OAuth token (backups in the user's Drive), renewed from the hub first. Credentials Google refuses become a
    :class:`~.store.StoreError` saying so ("sign in again" for a user).

Transfers
    Files up to ``chunk_size_bytes`` go up in one multipart request; larger ones through a resumable upload in
    chunks of that size (memory use is bounded by one chunk). Drive only creates or replaces the file when the last
    chunk arrives, so an interrupted put leaves the key as it was. Uploads and downloads are checked against
    Drive's ``md5Checksum``. Every request has a socket timeout; 429, 5xx, rate-limit 403s and network errors are
    retried with exponential backoff (honouring ``Retry-After``); a resumable session Drive forgot (404/410) is
    started again.

Pointing it elsewhere
    ``api_root_url`` (an emulator, or a Drive-compatible endpoint) rewrites the root URL of googleapiclient's own
    static Drive v2 discovery document; the OAuth token endpoint comes from the key file or the user token.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from traitlets import Float, Integer, Unicode
from traitlets.config import LoggingConfigurable

from .store import ObjectInfo, ObjectNotFound, StoreError, check_key

# isort: split
# drive_auth first: it works around a broken pyOpenSSL before googleapiclient and pydrive2 are imported.
from .drive_auth import SCOPE_DRIVE_FILE, DriveAuth, DriveCredentials, ServiceAccountKey, UserToken
from .drive_calls import DriveCalls, status_of

# isort: split
import httplib2
from googleapiclient import discovery
from googleapiclient.discovery_cache import get_static_doc
from googleapiclient.http import MediaIoBaseDownload, MediaIoBaseUpload
from pydrive2.drive import GoogleDrive
from pydrive2.files import GoogleDriveFile

__all__ = ["DriveSettings", "DriveStore", "DriveTarget"]

log = logging.getLogger(__name__)

FOLDER_MIME = "application/vnd.google-apps.folder"
#: Drive's resumable uploads take chunks in multiples of this (except the last one).
CHUNK_GRANULARITY = 256 * 1024


@dataclass(frozen=True)
class DriveSettings:
    """How a :class:`DriveStore` finds its folder and talks to Drive (see :class:`DriveTarget` for each field)."""

    folder_name: str = "DO-LAB backups"
    folder_id: str | None = None
    scope: str = SCOPE_DRIVE_FILE
    api_root_url: str | None = None
    chunk_size_bytes: int = 16 * 1024 * 1024
    timeout_seconds: float = 60.0
    max_retries: int = 6
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0


@dataclass(frozen=True)
class _Entry:
    id: str
    size: int
    md5: str | None


def _quote(value: str) -> str:
    """A string literal of Drive's query language."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class _HashingWriter(io.RawIOBase):
    """A file wrapper that hashes what MediaIoBaseDownload writes."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.md5 = hashlib.md5()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.md5.update(data)
        return self.target.write(data)


class DriveStore:
    """One user's backups in Google Drive, through pydrive2 (see the module docstring for layout and behaviour).

    Thread-safe: pydrive2 keeps one authorized HTTP connection per thread; the folder and key lookups are shared
    under a lock.
    """

    def __init__(self, user: str, credentials: DriveCredentials, settings: DriveSettings | None = None) -> None:
        self.user = user
        self.credentials = credentials
        self.settings = settings or DriveSettings()
        if self.settings.chunk_size_bytes < CHUNK_GRANULARITY or self.settings.chunk_size_bytes % CHUNK_GRANULARITY:
            raise ValueError(f"chunk_size_bytes must be a positive multiple of {CHUNK_GRANULARITY}")
        root = self.settings.folder_id or self.settings.folder_name
        self.description = f"Google Drive folder {root}/{user}"
        self._lock = threading.Lock()
        self._folder: str | None = None
        self._entries: dict[str, _Entry] = {}
        self._duplicates: dict[str, list[str]] = {}  # key -> ids of older files with the same title
        self._listed = False
        self._authz = DriveAuth(user, credentials, self.settings.scope, self.settings.timeout_seconds)
        self._auth = self._authz.google_auth
        self._auth.http = self._auth.credentials.authorize(self._authz.new_http())
        self._auth.service = self._build_service(self._auth.http)
        self._drive = GoogleDrive(self._auth)
        self._call = DriveCalls(
            user,
            self.description,
            self._authz,
            self.settings.max_retries,
            self.settings.backoff_base_seconds,
            self.settings.backoff_max_seconds,
        )

    def _build_service(self, http: httplib2.Http) -> Any:
        root = self.settings.api_root_url
        if not root:
            return discovery.build("drive", "v2", http=http, cache_discovery=False, static_discovery=True)
        doc = json.loads(get_static_doc("drive", "v2") or "{}")
        root = root.rstrip("/") + "/"
        doc["rootUrl"] = root
        doc["baseUrl"] = root + doc["servicePath"]
        doc.pop("mtlsRootUrl", None)
        return discovery.build_from_document(doc, http=http)

    # -- folders and keys ----------------------------------------------------------------------------------------

    def _find_or_create_folder(self, title: str, parent: str) -> str:
        query = (
            f"title = {_quote(title)} and {_quote(parent)} in parents and "
            f"mimeType = {_quote(FOLDER_MIME)} and trashed = false"
        )
        found = self._call(f"looking for the folder {title}", lambda: self._drive.ListFile({"q": query}).GetList())
        if found:
            return str(min(found, key=lambda f: (f["createdDate"], f["id"]))["id"])
        folder = self._drive.CreateFile({"title": title, "mimeType": FOLDER_MIME, "parents": [{"id": parent}]})
        self._call(f"creating the folder {title}", lambda: folder.Upload({"http": self._authz.http()}))
        log.info("Created the Google Drive folder %s for %s", title, self.user)
        return str(folder["id"])

    def _user_folder(self) -> str:
        with self._lock:
            if self._folder is None:
                root = self.settings.folder_id or self._find_or_create_folder(self.settings.folder_name, "root")
                self._folder = self._find_or_create_folder(self.user, root)
            return self._folder

    def _items(self, query: str, doing: str) -> Iterator[dict[str, Any]]:
        """Every file matching ``query``, page by page (each page retried on its own)."""
        listing = self._drive.ListFile({"q": query, "maxResults": 1000})
        while True:
            page = self._call(doing, lambda: next(listing, None))
            if page is None:
                return
            yield from page

    @staticmethod
    def _entry(item: dict[str, Any]) -> _Entry:
        return _Entry(id=str(item["id"]), size=int(item.get("fileSize") or 0), md5=item.get("md5Checksum"))

    def _lookup_all(self, key: str) -> list[dict[str, Any]]:
        """Every live file titled ``key`` in the user's folder, newest first."""
        query = f"title = {_quote(key)} and {_quote(self._user_folder())} in parents and trashed = false"
        items = [i for i in self._items(query, f"looking up {key}") if i.get("mimeType") != FOLDER_MIME]
        return sorted(items, key=lambda i: (i.get("modifiedDate", ""), i["id"]), reverse=True)

    def _lookup(self, key: str, fresh: bool = False, trust_listing: bool = False) -> _Entry | None:
        """The newest file titled ``key``: cached, else one query.

        ``trust_listing``: after a full :meth:`list`, a key it did not see counts as missing without a query (puts;
        a concurrent writer's new key then gets a duplicate title, which reads, lists and deletes all handle).
        """
        with self._lock:
            entry = None if fresh else self._entries.get(key)
            if entry is not None or (trust_listing and self._listed and not fresh):
                return entry
        items = self._lookup_all(key)
        if not items:
            with self._lock:
                self._entries.pop(key, None)
            return None
        entry = self._entry(items[0])
        with self._lock:
            self._entries[key] = entry
            self._duplicates[key] = [str(i["id"]) for i in items[1:]]
        return entry

    # -- ObjectStore ---------------------------------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (one paginated query over the user's folder)."""
        query = f"{_quote(self._user_folder())} in parents and trashed = false and mimeType != {_quote(FOLDER_MIME)}"
        seen: dict[str, _Entry] = {}
        duplicates: dict[str, list[str]] = {}
        for item in self._items(query, "listing the backup"):
            key = str(item.get("title", ""))
            try:
                check_key(key)
            except ValueError:
                continue
            entry = self._entry(item)
            if key in seen:
                duplicates.setdefault(key, []).append(entry.id)
                continue
            seen[key] = entry
            if key.startswith(prefix):
                yield ObjectInfo(key=key, size=entry.size)
        with self._lock:
            # Keys cached but not seen were deleted elsewhere or put meanwhile: a stale id is found out on use.
            self._entries = {**self._entries, **seen}
            self._duplicates = duplicates
            self._listed = True

    def put_file(self, key: str, path: Path) -> None:
        """Upload ``path`` as ``key`` (multipart when small, resumable in chunks otherwise), replacing any old one."""
        check_key(key)
        md5 = hashlib.md5()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1024 * 1024), b""):
                md5.update(block)
            size = f.tell()
            self._put(key, f, size, md5.hexdigest())

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` as ``key``, replacing any old one."""
        check_key(key)
        self._put(key, io.BytesIO(data), len(data), hashlib.md5(data).hexdigest())

    def _put(self, key: str, stream: IO[bytes], size: int, md5: str) -> None:
        doing = f"uploading {key}"
        folder = self._user_folder()
        existing = self._lookup(key, trust_listing=True)
        attempt = 0
        while True:
            stream.seek(0)
            try:
                result = self._upload(key, folder, existing, stream, size, doing)
                break
            except StoreError as e:
                # The file we meant to replace is gone (deleted elsewhere): create it instead, once.
                if existing is not None and status_of(e.__cause__ or e) == 404 and attempt == 0:
                    existing = self._lookup(key, fresh=True)
                    attempt += 1
                    continue
                raise
        if result.get("md5Checksum") != md5 or int(result.get("fileSize") or -1) != size:
            raise StoreError(f"Google Drive stored a damaged copy of {key}; the sync will upload it again later.")
        with self._lock:
            self._entries[key] = self._entry(result)

    def _upload(
        self, key: str, folder: str, existing: _Entry | None, stream: IO[bytes], size: int, doing: str
    ) -> dict[str, Any]:
        files = self._auth.service.files()
        resumable = size > self.settings.chunk_size_bytes

        def request() -> Any:
            stream.seek(0)
            media = MediaIoBaseUpload(
                stream, "application/octet-stream", chunksize=self.settings.chunk_size_bytes, resumable=resumable
            )
            if existing is not None:
                return files.update(fileId=existing.id, body={}, media_body=media, supportsAllDrives=True)
            body = {"title": key, "parents": [{"id": folder}], "mimeType": "application/octet-stream"}
            return files.insert(body=body, media_body=media, supportsAllDrives=True)

        if not resumable:
            return self._call(doing, lambda: request().execute(http=self._authz.http()))

        upload = request()
        restarts = 0

        def next_chunk() -> Any:
            return upload.next_chunk(http=self._authz.http())[1]

        while True:
            try:
                body = self._call(doing, next_chunk)
            except StoreError as e:
                # Drive forgot the session (expired or dropped): start the upload again from the first byte.
                if (
                    status_of(e.__cause__ or e) in (404, 410)
                    and upload.resumable_uri
                    and restarts < self.settings.max_retries
                ):
                    restarts += 1
                    log.warning("Google Drive dropped the upload session of %s for %s; starting again", key, self.user)
                    upload = request()
                    continue
                raise
            if body is not None:
                return dict(body)

    def get_file(self, key: str, path: Path) -> None:
        """Download ``key`` into ``path`` in chunks, checked against Drive's md5."""
        check_key(key)
        with open(path, "wb") as f:
            self._download(key, f)

    def get_bytes(self, key: str) -> bytes:
        """The content of ``key``."""
        check_key(key)
        buffer = io.BytesIO()
        self._download(key, buffer)
        return buffer.getvalue()

    def _download(self, key: str, target: IO[bytes]) -> None:
        doing = f"downloading {key}"
        entry = self._lookup(key)
        for attempt in range(2):
            if entry is None:
                raise ObjectNotFound(f"The backup has no object {key} in {self.description}.")
            target.seek(0)
            target.truncate()
            writer = _HashingWriter(target)
            request = self._auth.service.files().get_media(fileId=entry.id, supportsAllDrives=True)
            downloader = MediaIoBaseDownload(writer, request, chunksize=self.settings.chunk_size_bytes)

            def next_chunk(downloader: MediaIoBaseDownload = downloader, request: Any = request) -> bool:
                request.http = self._authz.http()
                return bool(downloader.next_chunk()[1])

            try:
                while not self._call(doing, next_chunk):
                    pass
            except StoreError as e:
                if status_of(e.__cause__ or e) == 404 and attempt == 0:
                    entry = self._lookup(key, fresh=True)  # the cached id went stale
                    continue
                raise
            if not entry.md5 or writer.md5.hexdigest() == entry.md5:
                return
            if attempt == 0:
                # Another writer may have replaced the content since it was cached: compare with Drive's md5 now.
                entry = self._lookup(key, fresh=True)
                if entry is not None and writer.md5.hexdigest() == entry.md5:
                    return
                continue
            raise StoreError(f"The copy of {key} downloaded from Google Drive is damaged; try the restore again.")

    def delete(self, keys: Iterable[str]) -> None:
        """Delete these keys permanently (every duplicate too); missing keys are ignored."""
        keys = [check_key(k) for k in keys]
        if len(keys) > 20 and not self._listed:
            for _ in self.list():  # one listing instead of a query per key
                pass
        for key in keys:
            entry = self._lookup(key, fresh=not self._listed, trust_listing=True)  # fresh: find duplicates too
            with self._lock:
                ids = ([entry.id] if entry else []) + self._duplicates.pop(key, [])
                self._entries.pop(key, None)
            for file_id in ids:
                self._delete_id(file_id, key)

    def _delete_id(self, file_id: str, key: str) -> None:
        drive_file = GoogleDriveFile(auth=self._auth, metadata={"id": file_id}, uploaded=True)
        try:
            self._call(f"deleting {key}", lambda: drive_file.Delete({"http": self._authz.http()}))
        except StoreError as e:
            if status_of(e.__cause__ or e) != 404:
                raise

    def close(self) -> None:
        """Drop this store's connections and caches."""
        with self._lock:
            self._entries.clear()
            self._duplicates.clear()
            self._listed = False
        self._authz.close()


class DriveTarget(LoggingConfigurable):
    """Admin configuration of the Google Drive backup target; :meth:`store_for` makes each user's store."""

    service_account_key_file = Unicode(
        "",
        config=True,
        help="""Path of a Google service account's JSON key. Backups then go to that account's Drive, one folder
        per user. Leave empty to use each user's own Google token (Google login with Drive enabled).""",
    )
    folder_name = Unicode(
        "DO-LAB backups",
        config=True,
        help="Name of the folder (in the account's My Drive) that holds one folder per user. Created if missing.",
    )
    folder_id = Unicode(
        "",
        config=True,
        help="""Id of an existing Drive folder to hold the per-user folders, instead of `folder_name`
        (for example a folder shared with the service account; that needs the full `drive` scope).""",
    )
    scope = Unicode(
        SCOPE_DRIVE_FILE,
        config=True,
        help="OAuth scope asked for with the service account (default drive.file: only files DO-LAB created).",
    )
    api_root_url = Unicode(
        "",
        config=True,
        help="Root URL of the Drive API (empty: Google's). For a Drive-compatible endpoint or an emulator.",
    )
    chunk_size_mb = Integer(
        16,
        config=True,
        help="Files larger than this many MiB are uploaded resumably in chunks of this size; smaller in one request.",
    )
    timeout_seconds = Float(60.0, config=True, help="Socket timeout of each request to Google, in seconds.")
    max_retries = Integer(
        6, config=True, help="Retries of a request Google answers with 429, 5xx or a network error, with backoff."
    )
    backoff_base_seconds = Float(
        1.0, config=True, help="First retry delay in seconds (doubled each retry, unless Google says Retry-After)."
    )

    def settings(self) -> DriveSettings:
        """The per-store settings these traits make."""
        return DriveSettings(
            folder_name=self.folder_name,
            folder_id=self.folder_id or None,
            scope=self.scope,
            api_root_url=self.api_root_url or None,
            chunk_size_bytes=self.chunk_size_mb * 1024 * 1024,
            timeout_seconds=self.timeout_seconds,
            max_retries=self.max_retries,
            backoff_base_seconds=self.backoff_base_seconds,
        )

    def store_for(self, user: str, token: UserToken | None = None) -> DriveStore:
        """The store of ``user``: through the service account when one is configured, else the user's token."""
        settings = self.settings()
        if self.service_account_key_file:
            return DriveStore(user, ServiceAccountKey(Path(self.service_account_key_file)), settings)
        if token is None:
            raise StoreError(
                f"Google Drive backup needs {user} to sign in to DO-LAB with Google (no Drive token is stored)."
            )
        return DriveStore(user, token, replace(settings, scope=SCOPE_DRIVE_FILE))
