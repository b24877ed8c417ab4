"""Google Drive backup target: :class:`DriveStore`, an :class:`~.store.ObjectStore` on pydrive2.

Layout
    One folder per user, named after the user, inside a root folder: the configured ``folder_id``, or the folder
    called ``folder_name`` (default ``DO-LAB backups``) in the account's My Drive. Both are found by name and
    created on first use; if a race ever made two, the oldest is used. Store keys are **flat titles** in the user's
    folder (``blobs/ab/ab12...`` is one file with that title): one ``files.list`` query finds any key, a listing is
    one paginated query, and no per-segment folders have to be created or looked up.

Authentication (two kinds of :data:`DriveCredentials`)
    - :class:`ServiceAccountKey`: the JSON key file of a service account (its ``token_uri`` is honoured); the
      backups then live in the service account's own Drive, one folder per user.
    - :class:`UserToken`: a user's OAuth token, as the DO-LAB authenticator stores it with the ``drive.file`` scope
      (:mod:`.tokens` reads it from auth_state); the backups live in the user's own Drive. When the access token has
      expired (or Drive answers 401) a fresh one comes from ``UserToken.renew`` (the hub, which renews tokens), and
      only failing that from the token endpoint, when the OAuth client's id and secret are known.
    Credentials Google refuses become a :class:`~.store.StoreError` saying so ("sign in again" for a user).

Transfers
    Files up to ``chunk_size_bytes`` go up in one multipart request; larger ones through a resumable upload in
    chunks of that size (memory use is bounded by one chunk). Drive only creates or replaces the file when the last
    chunk arrives, so an interrupted put leaves the key as it was. Uploads and downloads are checked against
    Drive's ``md5Checksum``. Every request has a socket timeout; 429, 5xx, rate-limit 403s and network errors are
    retried with exponential backoff (honouring ``Retry-After``); a resumable session Drive forgot (404/410) is
    started again.

Pointing it elsewhere
    ``api_root_url`` (an emulator, or a Drive-compatible endpoint) rewrites the root URL of googleapiclient's own
    static Drive v2 discovery document; the OAuth token endpoint comes from the key file or :class:`UserToken`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, TypeVar

from traitlets import Float, Integer, Unicode
from traitlets.config import LoggingConfigurable

from .store import ObjectInfo, ObjectNotFound, StoreError, check_key


def _import_pydrive2() -> None:
    """Import pydrive2, working around a broken pyOpenSSL.

    pydrive2 imports oauth2client, which tries pyOpenSSL first and only falls back (to its pure-Python RSA signer,
    on ``rsa``) on ImportError. pydrive2 pins ``pyOpenSSL<=24.2.1`` and every such release caps ``cryptography``
    below 44, while runpod 1.12 needs ``cryptography>=50``; pip can then only pick pyOpenSSL 22, whose import
    fails with AttributeError. That pyOpenSSL is unusable anyway, so it is marked missing and oauth2client falls
    back as designed.
    """
    try:
        import OpenSSL.crypto  # noqa: F401
    except ImportError:
        pass
    except AttributeError:
        sys.modules["OpenSSL"] = None  # type: ignore[assignment]


_import_pydrive2()

import httplib2  # noqa: E402
from googleapiclient import discovery, errors  # noqa: E402
from googleapiclient.discovery_cache import get_static_doc  # noqa: E402
from googleapiclient.http import MediaIoBaseDownload, MediaIoBaseUpload  # noqa: E402
from oauth2client.client import AccessTokenRefreshError, HttpAccessTokenRefreshError, OAuth2Credentials  # noqa: E402
from pydrive2.auth import AuthError, GoogleAuth  # noqa: E402
from pydrive2.drive import GoogleDrive  # noqa: E402
from pydrive2.files import ApiRequestError, GoogleDriveFile  # noqa: E402
from pydrive2.settings import InvalidConfigError  # noqa: E402

__all__ = ["DriveCredentials", "DriveSettings", "DriveStore", "DriveTarget", "ServiceAccountKey", "UserToken"]

log = logging.getLogger(__name__)

FOLDER_MIME = "application/vnd.google-apps.folder"
SCOPE_DRIVE_FILE = "https://www.googleapis.com/auth/drive.file"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
#: Drive's resumable uploads take chunks in multiples of this (except the last one).
CHUNK_GRANULARITY = 256 * 1024
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})

T = TypeVar("T")


@dataclass(frozen=True)
class ServiceAccountKey:
    """A service account's JSON key file (``subject``: a Workspace user to impersonate by domain-wide delegation)."""

    key_file: Path
    subject: str | None = None


@dataclass(frozen=True)
class UserToken:
    """A user's Google OAuth token, as the authenticator keeps it in auth_state.

    ``expires_at`` is when ``access_token`` stops working (aware datetime; None: unknown, refreshed on a 401).

    ``renew``: where a fresh token comes from when this one has expired or Drive refused it (the sync service reads
    the user's auth_state again from the hub, which renews tokens). It is asked first; the store renews the token
    itself with ``refresh_token`` only when ``renew`` gives nothing fresher and the OAuth client's id and secret are
    known. Without either, an expired token ends the operation with the "sign in again" sentence.
    """

    access_token: str | None
    refresh_token: str
    client_id: str
    client_secret: str
    expires_at: datetime | None = None
    token_uri: str = GOOGLE_TOKEN_URI
    renew: Callable[[], UserToken | None] | None = field(default=None, compare=False)

    @property
    def can_refresh(self) -> bool:
        """Whether this token can be renewed here, with the refresh token and the OAuth client's credentials."""
        return bool(self.refresh_token and self.client_id and self.client_secret)

    def __repr__(self) -> str:
        return f"UserToken(client_id={self.client_id!r}, expires_at={self.expires_at!r})"


def _naive_utc(moment: datetime | None) -> datetime | None:
    """oauth2client's expiry: a naive UTC datetime."""
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment else None


class _RenewableCredentials(OAuth2Credentials):
    """oauth2client credentials that get a fresh access token from :attr:`UserToken.renew` (the hub) first, and
    only then, when they can, from the token endpoint with the refresh token."""

    def __init__(self, token: UserToken, scope: str) -> None:
        super().__init__(
            access_token=token.access_token,
            client_id=token.client_id,
            client_secret=token.client_secret,
            refresh_token=token.refresh_token,
            token_expiry=_naive_utc(token.expires_at),
            token_uri=token.token_uri,
            user_agent="dolab-sync",
            scopes=[scope],
        )
        self._token = token

    def _do_refresh_request(self, http: Any) -> None:
        fresh = self._token.renew() if self._token.renew is not None else None
        soon = datetime.now(timezone.utc) + timedelta(seconds=60)
        if (
            fresh is not None
            and fresh.access_token
            and fresh.access_token != self.access_token
            and (fresh.expires_at is None or fresh.expires_at > soon)
        ):
            self.access_token = fresh.access_token
            self.token_expiry = _naive_utc(fresh.expires_at)
            self.invalid = False
            return
        if self._token.can_refresh:
            super()._do_refresh_request(http)
            return
        self.invalid = True
        raise AccessTokenRefreshError("no fresh access token")


DriveCredentials = ServiceAccountKey | UserToken


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


def _http_error(exc: BaseException) -> errors.HttpError | None:
    """The HTTP error behind ``exc``: itself, the one pydrive2 wrapped, or the one pydrive2 failed to wrap
    (its ApiRequestError raises ValueError on a body that is not JSON, such as a proxy's HTML 502 page)."""
    if isinstance(exc, errors.HttpError):
        return exc
    if isinstance(exc, ApiRequestError) and exc.args and isinstance(exc.args[0], errors.HttpError):
        return exc.args[0]
    if isinstance(exc, ValueError):
        context = exc.__context__
        for _ in range(5):
            if context is None or isinstance(context, errors.HttpError):
                return context
            context = context.__context__
    return None


def _status(exc: BaseException) -> int | None:
    http_error = _http_error(exc)
    return http_error.resp.status if http_error is not None else None


def _reason(exc: BaseException) -> str:
    http_error = _http_error(exc)
    if http_error is None:
        return ""
    try:
        details = json.loads(http_error.content or b"{}").get("error", {})
        return str((details.get("errors") or [{}])[0].get("reason", ""))
    except (ValueError, AttributeError):
        return ""


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
        self._refresh_lock = threading.Lock()
        self._folder: str | None = None
        self._entries: dict[str, _Entry] = {}
        self._duplicates: dict[str, list[str]] = {}  # key -> ids of older files with the same title
        self._listed = False
        self._auth = self._authenticate()
        self._drive = GoogleDrive(self._auth)

    # -- authentication ------------------------------------------------------------------------------------------

    def _new_http(self) -> httplib2.Http:
        http = httplib2.Http(timeout=self.settings.timeout_seconds)
        # Drive answers 308 Resume Incomplete to resumable upload chunks: not a redirect to follow.
        http.redirect_codes = http.redirect_codes - {308}
        return http

    def _authenticate(self) -> GoogleAuth:
        creds = self.credentials
        if isinstance(creds, ServiceAccountKey):
            try:
                auth = GoogleAuth(
                    settings={
                        "client_config_backend": "service",
                        "service_config": {
                            "client_json_file_path": str(creds.key_file),
                            "client_user_email": creds.subject,
                        },
                        "oauth_scope": [self.settings.scope],
                    },
                    http_timeout=self.settings.timeout_seconds,
                )
                auth.ServiceAuth()  # reads the key; no request yet (the first API call fetches a token)
            except (OSError, ValueError, KeyError, InvalidConfigError) as e:
                raise StoreError(
                    "The Google Drive service account key could not be read; an admin must check the key file "
                    "configured for the sync service."
                ) from e
        else:
            if not creds.access_token and not creds.can_refresh:
                raise StoreError(self._auth_sentence())
            auth = GoogleAuth(
                settings={
                    "client_config_backend": "settings",
                    "client_config": {
                        "client_id": creds.client_id,
                        "client_secret": creds.client_secret,
                        "token_uri": creds.token_uri,
                    },
                    "oauth_scope": [self.settings.scope],
                    "get_refresh_token": True,
                },
                http_timeout=self.settings.timeout_seconds,
            )
            auth.credentials = _RenewableCredentials(creds, self.settings.scope)
        auth.http = auth.credentials.authorize(self._new_http())
        auth.service = self._build_service(auth.http)
        return auth

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

    def _http(self) -> httplib2.Http:
        """This thread's authorized connection (the one pydrive2's own calls use too)."""
        local = self._auth.thread_local
        if getattr(local, "http", None) is None:
            local.http = self._auth.credentials.authorize(self._new_http())
        return local.http

    def _ensure_fresh(self) -> None:
        """Refresh the access token ahead of its expiry (pydrive2 would otherwise try an interactive login)."""
        creds = self._auth.credentials
        expiry = getattr(creds, "token_expiry", None)
        soon = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(seconds=60)
        if creds.access_token and not creds.invalid and (expiry is None or expiry > soon):
            return
        with self._refresh_lock:
            if creds.access_token and not creds.invalid and (creds.token_expiry is None or creds.token_expiry > soon):
                return
            creds.refresh(self._new_http())
            log.info("Refreshed the Google Drive access token for %s", self.user)

    def _auth_sentence(self) -> str:
        if isinstance(self.credentials, UserToken):
            return (
                f"Google Drive refused the stored credentials of {self.user}; sign in to DO-LAB again with Google "
                "to renew them."
            )
        return (
            "Google Drive refused the sync service's service account credentials; an admin must check its key file "
            "and that the account is enabled."
        )

    # -- error handling and retries ------------------------------------------------------------------------------

    def _failure(self, exc: BaseException, doing: str) -> StoreError:
        """The sentence for a failure that retries did not cure."""
        status = _status(exc)
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, AccessTokenRefreshError | AuthError) or status == 401:
            return StoreError(self._auth_sentence())
        if status == 403:
            if _reason(exc) in ("storageQuotaExceeded", "quotaExceeded"):
                return StoreError(f"Google Drive is full while {doing}; free space in that Drive or ask an admin.")
            return StoreError(
                f"Google Drive denied access while {doing} in {self.description}; check that the account may use "
                "that folder."
            )
        if status == 404:
            return StoreError(
                f"Google Drive found no such file or folder while {doing} in {self.description}; check that the "
                "configured folder exists and that this account may use it."
            )
        if status is not None:
            return StoreError(f"Google Drive answered HTTP {status} while {doing}; the sync will try again later.")
        return StoreError(
            f"Google Drive could not be reached while {doing} ({type(exc).__name__}); the sync will try again later."
        )

    def _retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, HttpAccessTokenRefreshError):
            return exc.status in _RETRY_STATUSES
        if isinstance(exc, AccessTokenRefreshError | AuthError | StoreError):
            return False
        status = _status(exc)
        if status is not None:
            return status in _RETRY_STATUSES or (status == 403 and _reason(exc) in _RATE_LIMIT_REASONS)
        return isinstance(exc, OSError | httplib2.HttpLib2Error)

    def _backoff(self, attempt: int, exc: BaseException, doing: str) -> None:
        http_error = _http_error(exc)
        delay = self.settings.backoff_base_seconds * (2**attempt) * (0.5 + random.random() / 2)
        if http_error is not None and http_error.resp.get("retry-after", "").isdigit():
            delay = float(http_error.resp["retry-after"])
        delay = min(delay, self.settings.backoff_max_seconds)
        log.warning(
            "Google Drive failed while %s for %s (%s); retry %d in %.1f s",
            doing,
            self.user,
            _status(exc) or type(exc).__name__,
            attempt + 1,
            delay,
        )
        time.sleep(delay)

    def _call(self, doing: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with a fresh token, retrying what Drive says may be retried; failures become StoreError."""
        attempt = 0
        while True:
            try:
                self._ensure_fresh()
                return fn()
            except Exception as e:
                if attempt < self.settings.max_retries and self._retryable(e):
                    self._backoff(attempt, e, doing)
                    attempt += 1
                    continue
                log.info("Google Drive call failed while %s for %s", doing, self.user, exc_info=True)
                raise self._failure(e, doing) from e

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
        self._call(f"creating the folder {title}", lambda: folder.Upload({"http": self._http()}))
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
                if existing is not None and _status(e.__cause__ or e) == 404 and attempt == 0:
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
            return self._call(doing, lambda: request().execute(http=self._http()))

        upload = request()
        restarts = 0

        def next_chunk() -> Any:
            return upload.next_chunk(http=self._http())[1]

        while True:
            try:
                body = self._call(doing, next_chunk)
            except StoreError as e:
                # Drive forgot the session (expired or dropped): start the upload again from the first byte.
                if (
                    _status(e.__cause__ or e) in (404, 410)
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
                request.http = self._http()
                return bool(downloader.next_chunk()[1])

            try:
                while not self._call(doing, next_chunk):
                    pass
            except StoreError as e:
                if _status(e.__cause__ or e) == 404 and attempt == 0:
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
            self._call(f"deleting {key}", lambda: drive_file.Delete({"http": self._http()}))
        except StoreError as e:
            if _status(e.__cause__ or e) != 404:
                raise

    def close(self) -> None:
        """Drop this store's connections and caches."""
        with self._lock:
            self._entries.clear()
            self._duplicates.clear()
            self._listed = False
        self._auth.thread_local.__dict__.clear()


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
