"""The emulator's in-memory world: accounts, OAuth clients and tokens, files, upload sessions, faults.

All of it is touched only from the server's single IOLoop thread, so it needs no locks.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

FOLDER_MIME = "application/vnd.google-apps.folder"
SCOPE_DRIVE = "https://www.googleapis.com/auth/drive"
SCOPE_DRIVE_FILE = "https://www.googleapis.com/auth/drive.file"
DRIVE_SCOPES = frozenset({SCOPE_DRIVE, SCOPE_DRIVE_FILE})


def new_id(length: int = 33) -> str:
    """An id shaped like Drive's (url-safe base64 letters, starting with 1)."""
    return "1" + base64.urlsafe_b64encode(secrets.token_bytes(length)).decode()[: length - 1].replace("=", "x")


def rfc3339(ts: float) -> str:
    """Drive's timestamp format: ``2026-11-26T08:00:00.000Z``."""
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass
class Account:
    """A Google account (a user or a service account) with its own My Drive root folder."""

    email: str
    root_id: str


@dataclass
class AccessToken:
    """An issued bearer token."""

    email: str
    scopes: frozenset[str]
    expires_at: float


@dataclass
class RefreshToken:
    """A user's offline grant to one OAuth client."""

    email: str
    client_id: str
    scopes: frozenset[str]


@dataclass
class DriveFile:
    """One file or folder."""

    id: str
    title: str
    mime_type: str
    owner: str
    parents: list[str]
    content: bytes | None = None
    trashed: bool = False
    readers: set[str] = field(default_factory=set)
    writers: set[str] = field(default_factory=set)
    description: str | None = None
    created: float = field(default_factory=time.time)
    modified: float = field(default_factory=time.time)
    version: int = 1

    @property
    def is_folder(self) -> bool:
        return self.mime_type == FOLDER_MIME

    def set_content(self, data: bytes) -> None:
        self.content = data
        self.modified = time.time()
        self.version += 1

    def can_read(self, email: str) -> bool:
        return email == self.owner or email in self.readers or email in self.writers

    def can_write(self, email: str) -> bool:
        return email == self.owner or email in self.writers


@dataclass
class UploadSession:
    """A resumable upload in progress (``uploadType=resumable``)."""

    id: str
    email: str
    metadata: dict
    file_id: str | None  # set for files.update, None for files.insert
    content_type: str
    total: int | None
    received: bytearray = field(default_factory=bytearray)
    result_id: str | None = None  # the file made when the last byte arrived


@dataclass
class Fault:
    """An injected failure: the next ``times`` requests matching method/path/query get ``status`` (after ``skip``).

    ``action`` is ``status`` (answer with ``status``, with ``Retry-After`` when ``retry_after`` is set) or
    ``drop_session`` (forget the resumable upload session the request addresses and answer 404, as Drive does
    for an expired session) or ``delay`` (answer normally after ``delay_seconds``: a hung server for timeouts).
    """

    status: int = 503
    method: str | None = None
    path: str | None = None
    query: str | None = None
    times: int = 1
    skip: int = 0
    retry_after: int | None = None
    action: str = "status"
    delay_seconds: float = 0.0
    html: bool = False  # answer ``status`` with an HTML page, as a proxy or Google's front end sometimes does

    def matches(self, method: str, path: str, query: str) -> bool:
        if self.method and self.method.upper() != method:
            return False
        if self.path and not re.search(self.path, path):
            return False
        return not (self.query and self.query not in query)


class World:
    """Everything the emulator knows."""

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.service_account_keys: dict[str, bytes] = {}  # client_email -> public key PEM
        self.oauth_clients: dict[str, str] = {}  # client_id -> client_secret
        self.access_tokens: dict[str, AccessToken] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.files: dict[str, DriveFile] = {}
        self.sessions: dict[str, UploadSession] = {}
        self.faults: list[Fault] = []
        self.requests: list[dict] = []
        self.access_token_lifetime_seconds = 3600

    def account(self, email: str) -> Account:
        """The account for ``email``, created with its root folder on first use."""
        if email not in self.accounts:
            root = DriveFile(id=new_id(), title="My Drive", mime_type=FOLDER_MIME, owner=email, parents=[])
            self.files[root.id] = root
            self.accounts[email] = Account(email=email, root_id=root.id)
        return self.accounts[email]

    def issue_access_token(self, email: str, scopes: frozenset[str]) -> tuple[str, int]:
        token = "ya29.emu-" + secrets.token_urlsafe(24)
        lifetime = self.access_token_lifetime_seconds
        self.access_tokens[token] = AccessToken(email=email, scopes=scopes, expires_at=time.time() + lifetime)
        return token, lifetime

    def issue_refresh_token(self, email: str, client_id: str, scopes: frozenset[str]) -> str:
        token = "1//emu-" + secrets.token_urlsafe(32)
        self.refresh_tokens[token] = RefreshToken(email=email, client_id=client_id, scopes=scopes)
        return token

    def take_fault(self, method: str, path: str, query: str) -> Fault | None:
        """The first armed fault this request trips, consuming one of its ``times``."""
        for fault in self.faults:
            if fault.times > 0 and fault.matches(method, path, query):
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                fault.times -= 1
                return fault
        return None

    def file_resource(self, f: DriveFile, base_url: str, email: str) -> dict:
        """The v2 ``drive#file`` resource of ``f`` as ``email`` sees it."""
        root_id = self.accounts[email].root_id if email in self.accounts else ""
        resource: dict = {
            "kind": "drive#file",
            "id": f.id,
            "etag": f'"{f.id}/{f.version}"',
            "selfLink": f"{base_url}/drive/v2/files/{f.id}",
            "title": f.title,
            "mimeType": f.mime_type,
            "labels": {"starred": False, "hidden": False, "trashed": f.trashed, "restricted": False, "viewed": True},
            "createdDate": rfc3339(f.created),
            "modifiedDate": rfc3339(f.modified),
            "parents": [
                {
                    "kind": "drive#parentReference",
                    "id": p,
                    "selfLink": f"{base_url}/drive/v2/files/{f.id}/parents/{p}",
                    "parentLink": f"{base_url}/drive/v2/files/{p}",
                    "isRoot": p == root_id,
                }
                for p in f.parents
            ],
            "owners": [
                {
                    "kind": "drive#user",
                    "displayName": f.owner,
                    "emailAddress": f.owner,
                    "isAuthenticatedUser": f.owner == email,
                }
            ],
            "editable": f.can_write(email),
            "copyable": True,
            "shared": bool(f.readers or f.writers),
            "version": str(f.version),
            "userPermission": {
                "kind": "drive#permission",
                "role": "owner" if f.owner == email else "writer" if email in f.writers else "reader",
                "type": "user",
            },
        }
        if f.description is not None:
            resource["description"] = f.description
        if not f.is_folder:
            data = f.content or b""
            resource.update(
                {
                    "downloadUrl": f"{base_url}/drive/v2/files/{f.id}?alt=media",
                    "fileSize": str(len(data)),
                    "quotaBytesUsed": str(len(data)),
                    "md5Checksum": hashlib.md5(data).hexdigest(),
                    "originalFilename": f.title,
                    "fileExtension": f.title.rsplit(".", 1)[1] if "." in f.title else "",
                }
            )
        return resource
