"""A Google Drive API (v2) and Google OAuth 2.0 token endpoint emulator on tornado, for the real SDKs.

What it speaks (the wire protocol googleapiclient and pydrive2 use, with Google's error bodies):

- ``POST /token``: the JWT bearer grant (service accounts; RS256 signature checked against the registered public
  key, ``aud``, ``iat``/``exp``) and the ``refresh_token`` grant (client id and secret checked; revoked or unknown
  refresh tokens get ``invalid_grant``). Access tokens expire after ``access_token_lifetime_seconds``.
- ``/drive/v2/files``: ``files.list`` (``q`` subset in :mod:`query`, ``maxResults``, ``pageToken``),
  ``files.get`` (``alt=media`` with ``Range``, 206 and 416), ``files.insert`` (metadata only),
  ``files.update``/``files.patch``, ``files.delete``, ``files.trash``/``files.untrash``; ``about.get``.
- ``/upload/drive/v2/files[/ID]``: ``uploadType=media``, ``multipart`` and ``resumable`` (session start answers
  ``Location``; chunked ``PUT`` with ``Content-Range``; ``308 Resume Incomplete`` with ``Range``; ``bytes */N``
  status queries; non-final chunks must be multiples of 256 KiB).
- ``GET /discovery/v1/apis/drive/v2/rest``: the discovery document, with ``rootUrl`` pointing here.
- Every account sees only files it owns or that were shared with it; anything else is 404 ``File not found``.
- ``/_emulator/...``: the control API for tests (accounts, clients, tokens, faults, request log, inspection);
  see :class:`tests.drive_emulator.client.DriveEmulatorClient`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from typing import Any
from urllib.parse import urlencode

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tornado import web

from .query import FileView, QueryError, compile_query
from .state import DRIVE_SCOPES, FOLDER_MIME, DriveFile, Fault, UploadSession, World, new_id

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CHUNK_GRANULARITY = 256 * 1024
#: Audiences Google accepts in a JWT bearer assertion besides its own URL (google-auth always sends the first).
GOOGLE_TOKEN_AUDIENCES = (
    "https://oauth2.googleapis.com/token",
    "https://accounts.google.com/o/oauth2/token",
    "https://www.googleapis.com/oauth2/v4/token",
)


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class DriveError(Exception):
    """An error answered with Drive's JSON error body."""

    def __init__(self, code: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.headers = headers or {}


def _not_found(file_id: str) -> DriveError:
    return DriveError(404, "notFound", f"File not found: {file_id}")


class BaseHandler(web.RequestHandler):
    """Request log, fault injection and Drive-shaped errors for every endpoint."""

    world: World
    authenticate = True

    def initialize(self, world: World) -> None:
        self.world = world
        self.email: str | None = None

    @property
    def base_url(self) -> str:
        return f"{self.request.protocol}://{self.request.host}"

    async def prepare(self) -> None:
        if self.request.path.startswith("/_emulator/"):
            return
        fault = self.world.take_fault(self.request.method or "", self.request.path, self.request.query)
        if fault is None:
            return
        if fault.action == "delay":
            await asyncio.sleep(fault.delay_seconds)  # then answer normally (the client may have given up)
            return
        if fault.action == "drop_session":
            upload_id = self.get_query_argument("upload_id", "")
            self.world.sessions.pop(upload_id, None)
            raise DriveError(404, "notFound", "Upload session not found or expired.")
        if fault.html:
            self.set_status(fault.status)
            self.set_header("Content-Type", "text/html; charset=UTF-8")
            self.finish(f"<html><body><h1>{fault.status}.</h1> That's an error.</body></html>")
            return
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        reason = "rateLimitExceeded" if fault.status == 429 else "backendError"
        raise DriveError(fault.status, reason, f"Injected fault {fault.status}", headers)

    def on_finish(self) -> None:
        if self.request.path.startswith("/_emulator/"):
            return
        self.world.requests.append(
            {
                "method": self.request.method,
                "path": self.request.path,
                "query": self.request.query,
                "status": self.get_status(),
                "email": self.email,
                "content_range": self.request.headers.get("Content-Range"),
                "body_bytes": len(self.request.body or b""),
            }
        )
        del self.world.requests[:-20000]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, DriveError):
            code, reason, message = exc.code, exc.reason, exc.message
        else:
            code, reason, message = status_code, "backendError", self._reason
        body = {
            "error": {
                "errors": [{"domain": "global", "reason": reason, "message": message}],
                "code": code,
                "message": message,
            }
        }
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(body))

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, DriveError):
            self.clear()
            self.set_status(exc.code)
            for name, value in exc.headers.items():
                self.set_header(name, value)
            try:
                self.write_error(exc.code, **kwargs)
            except Exception:
                pass
            if not self._finished:
                self.finish()
            return
        super().send_error(status_code, **kwargs)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, DriveError):
            super().log_exception(typ, value, tb)

    def send_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(body))

    def json_body(self) -> dict:
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError as e:
            raise DriveError(400, "parseError", "Parse Error") from e
        if not isinstance(body, dict):
            raise DriveError(400, "parseError", "Parse Error")
        return body

    # -- auth ------------------------------------------------------------------------------------------------

    def require_account(self) -> str:
        header = self.request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise DriveError(401, "required", "Login Required.")
        token = self.world.access_tokens.get(header[len("Bearer ") :])
        if token is None or token.expires_at <= time.time():
            raise DriveError(401, "authError", "Invalid Credentials")
        if not token.scopes & DRIVE_SCOPES:
            raise DriveError(
                403,
                "insufficientPermissions",
                "Insufficient Permission: Request had insufficient authentication scopes.",
            )
        self.email = token.email
        self.world.account(token.email)
        return token.email

    # -- files -----------------------------------------------------------------------------------------------

    def resolve_id(self, email: str, file_id: str) -> str:
        return self.world.accounts[email].root_id if file_id == "root" else file_id

    def readable(self, email: str, file_id: str) -> DriveFile:
        f = self.world.files.get(self.resolve_id(email, file_id))
        if f is None or not f.can_read(email):
            raise _not_found(file_id)
        return f

    def writable(self, email: str, file_id: str) -> DriveFile:
        f = self.readable(email, file_id)
        if not f.can_write(email):
            raise DriveError(
                403, "insufficientFilePermissions", "The user does not have sufficient permissions for this file."
            )
        return f

    def resource(self, f: DriveFile, email: str) -> dict:
        return self.world.file_resource(f, self.base_url, email)

    def parent_ids(self, email: str, metadata: dict) -> list[str] | None:
        parents = metadata.get("parents")
        if parents is None:
            return None
        if not isinstance(parents, list):
            raise DriveError(400, "invalid", "Invalid Value: parents")
        ids = []
        for parent in parents:
            pid = parent.get("id") if isinstance(parent, dict) else None
            if not pid:
                raise DriveError(400, "invalid", "Invalid Value: parents")
            folder = self.writable(email, pid)
            if not folder.is_folder:
                raise DriveError(400, "invalid", "Invalid Value: a parent is not a folder")
            ids.append(folder.id)
        return ids

    def create_file(self, email: str, metadata: dict, content: bytes | None, content_type: str | None) -> DriveFile:
        parents = self.parent_ids(email, metadata) or [self.world.accounts[email].root_id]
        mime = metadata.get("mimeType") or content_type or "application/octet-stream"
        if mime == FOLDER_MIME and content:
            raise DriveError(400, "invalid", "A folder cannot have content.")
        f = DriveFile(
            id=new_id(),
            title=str(metadata.get("title") or "Untitled"),
            mime_type=mime,
            owner=email,
            parents=parents,
            content=None if mime == FOLDER_MIME else (content or b""),
            description=metadata.get("description"),
        )
        self.world.files[f.id] = f
        return f

    def apply_metadata(self, email: str, f: DriveFile, metadata: dict) -> None:
        if "title" in metadata and metadata["title"] is not None:
            f.title = str(metadata["title"])
        if metadata.get("mimeType"):
            f.mime_type = metadata["mimeType"]
        if "description" in metadata:
            f.description = metadata["description"]
        parents = self.parent_ids(email, metadata)
        if parents:
            f.parents = parents
        labels = metadata.get("labels") or {}
        if "trashed" in labels:
            self.world_trash(f, bool(labels["trashed"]))
        f.modified = time.time()

    def descendants(self, f: DriveFile) -> list[DriveFile]:
        found: list[DriveFile] = []
        pending = [f.id]
        while pending:
            parent = pending.pop()
            for child in self.world.files.values():
                if parent in child.parents:
                    found.append(child)
                    if child.is_folder:
                        pending.append(child.id)
        return found

    def world_trash(self, f: DriveFile, trashed: bool) -> None:
        f.trashed = trashed
        for child in self.descendants(f):
            child.trashed = trashed


class TokenHandler(BaseHandler):
    """``POST /token``: Google's OAuth 2.0 token endpoint."""

    def oauth_error(self, status: int, error: str, description: str) -> None:
        self.send_json({"error": error, "error_description": description}, status)

    def post(self) -> None:
        grant = self.get_body_argument("grant_type", "")
        if grant == JWT_BEARER:
            self.jwt_grant()
        elif grant == "refresh_token":
            self.refresh_grant()
        else:
            self.oauth_error(400, "unsupported_grant_type", f"Invalid grant_type: {grant}")

    def jwt_grant(self) -> None:
        assertion = self.get_body_argument("assertion", "")
        try:
            head_b64, payload_b64, sig_b64 = assertion.split(".")
            header = json.loads(_b64url_decode(head_b64))
            claims = json.loads(_b64url_decode(payload_b64))
            signature = _b64url_decode(sig_b64)
        except ValueError:
            self.oauth_error(
                400, "invalid_grant", "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe"
            )
            return
        email = claims.get("iss", "")
        pem = self.world.service_account_keys.get(email)
        if header.get("alg") != "RS256" or pem is None:
            self.oauth_error(400, "invalid_grant", "Invalid grant: account not found")
            return
        key = serialization.load_pem_public_key(pem)
        assert isinstance(key, rsa.RSAPublicKey)
        try:
            key.verify(signature, f"{head_b64}.{payload_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            self.oauth_error(400, "invalid_grant", "Invalid JWT Signature.")
            return
        now = time.time()
        iat, exp = claims.get("iat", 0), claims.get("exp", 0)
        if (
            claims.get("aud") not in (f"{self.base_url}/token", *GOOGLE_TOKEN_AUDIENCES)
            or not (iat - 300 <= now <= exp + 300)
            or exp - iat > 3600
        ):
            self.oauth_error(
                400, "invalid_grant", "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe"
            )
            return
        scopes = frozenset(str(claims.get("scope", "")).split())
        token, lifetime = self.world.issue_access_token(email, scopes)
        self.email = email
        self.send_json({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"})

    def refresh_grant(self) -> None:
        client_id = self.get_body_argument("client_id", "")
        secret = self.get_body_argument("client_secret", "")
        if client_id not in self.world.oauth_clients or self.world.oauth_clients[client_id] != secret:
            self.oauth_error(401, "invalid_client", "The OAuth client was not found.")
            return
        grant = self.world.refresh_tokens.get(self.get_body_argument("refresh_token", ""))
        if grant is None or grant.client_id != client_id:
            self.oauth_error(400, "invalid_grant", "Token has been expired or revoked.")
            return
        token, lifetime = self.world.issue_access_token(grant.email, grant.scopes)
        self.email = grant.email
        self.send_json(
            {
                "access_token": token,
                "expires_in": lifetime,
                "token_type": "Bearer",
                "scope": " ".join(sorted(grant.scopes)),
            }
        )


class DiscoveryHandler(BaseHandler):
    """``GET /discovery/v1/apis/drive/v2/rest``: the Drive v2 discovery document, rooted at this server."""

    def get(self) -> None:
        from googleapiclient.discovery_cache import get_static_doc

        doc = json.loads(get_static_doc("drive", "v2") or "{}")
        doc["rootUrl"] = f"{self.base_url}/"
        doc["baseUrl"] = f"{self.base_url}/drive/v2/"
        doc.pop("mtlsRootUrl", None)
        self.send_json(doc)


class UserInfoHandler(BaseHandler):
    """``GET /oauth2/v1/userinfo``: the user info oauthenticator's Google login reads (``id``, ``verified_email``;
    a Workspace account's ``hd``), at login and at every refresh."""

    def get(self) -> None:
        email = self.require_account()
        self.send_json({"id": email, "email": email, "verified_email": True, "name": email})


class AboutHandler(BaseHandler):
    """``GET /drive/v2/about``."""

    def get(self) -> None:
        email = self.require_account()
        self.send_json(
            {
                "kind": "drive#about",
                "name": email,
                "rootFolderId": self.world.accounts[email].root_id,
                "user": {
                    "kind": "drive#user",
                    "displayName": email,
                    "emailAddress": email,
                    "isAuthenticatedUser": True,
                },
                "quotaBytesTotal": str(15 * 1024**3),
                "quotaBytesUsed": str(
                    sum(len(f.content or b"") for f in self.world.files.values() if f.owner == email)
                ),
            }
        )


class FilesHandler(BaseHandler):
    """``GET /drive/v2/files`` (files.list) and ``POST /drive/v2/files`` (files.insert, metadata only)."""

    def get(self) -> None:
        email = self.require_account()
        try:
            predicate = compile_query(self.get_query_argument("q", None))
        except QueryError as e:
            raise DriveError(400, "invalid", f"Invalid Value: {e}") from e
        try:
            max_results = min(max(int(self.get_query_argument("maxResults", "100")), 1), 1000)
            offset = int(self.get_query_argument("pageToken", "0") or "0")
        except ValueError as e:
            raise DriveError(400, "invalid", "Invalid Value") from e
        account = self.world.accounts[email]
        roots = {a.root_id for a in self.world.accounts.values()}
        matches = []
        for f in self.world.files.values():
            if f.id in roots or not f.can_read(email):
                continue
            parents = frozenset(f.parents) | ({"root"} if account.root_id in f.parents else set())
            view = FileView(
                title=f.title,
                mime_type=f.mime_type,
                trashed=f.trashed,
                parents=parents,
                owners=frozenset({f.owner}),
                writers=frozenset(f.writers | {f.owner}),
                readers=frozenset(f.readers | f.writers | {f.owner}),
            )
            if predicate(view):
                matches.append(f)
        page = matches[offset : offset + max_results]
        body: dict = {"kind": "drive#fileList", "items": [self.resource(f, email) for f in page]}
        if offset + max_results < len(matches):
            body["nextPageToken"] = str(offset + max_results)
        self.send_json(body)

    def post(self) -> None:
        email = self.require_account()
        f = self.create_file(email, self.json_body(), None, None)
        self.send_json(self.resource(f, email))


class FileHandler(BaseHandler):
    """``/drive/v2/files/ID``: files.get (and ``alt=media``), files.update, files.patch, files.delete."""

    def get(self, file_id: str) -> None:
        email = self.require_account()
        f = self.readable(email, file_id)
        if self.get_query_argument("alt", "json") != "media":
            self.send_json(self.resource(f, email))
            return
        if f.is_folder or f.content is None:
            raise DriveError(403, "fileNotDownloadable", "Only files with binary content can be downloaded.")
        self.send_media(f.content)

    def send_media(self, data: bytes) -> None:
        total = len(data)
        self.set_header("Content-Type", "application/octet-stream")
        range_header = self.request.headers.get("Range")
        if not range_header:
            self.finish(data)
            return
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
        if not match:
            raise DriveError(400, "invalid", "Invalid Range header")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) else total - 1
        if start >= total:
            self.set_status(416)
            self.set_header("Content-Range", f"bytes */{total}")
            self.finish()
            return
        end = min(end, total - 1)
        self.set_status(206)
        self.set_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.finish(data[start : end + 1])

    def put(self, file_id: str) -> None:
        email = self.require_account()
        f = self.writable(email, file_id)
        self.apply_metadata(email, f, self.json_body())
        self.send_json(self.resource(f, email))

    def patch(self, file_id: str) -> None:
        self.put(file_id)

    def delete(self, file_id: str) -> None:
        email = self.require_account()
        f = self.readable(email, file_id)
        if f.owner != email:
            raise DriveError(
                403, "insufficientFilePermissions", "The user does not have sufficient permissions for this file."
            )
        for child in [*self.descendants(f), f]:
            self.world.files.pop(child.id, None)
        self.set_status(204)
        self.finish()


class FileActionHandler(BaseHandler):
    """``POST /drive/v2/files/ID/trash`` and ``/untrash``."""

    def post(self, file_id: str, action: str) -> None:
        email = self.require_account()
        f = self.writable(email, file_id)
        self.world_trash(f, action == "trash")
        self.send_json(self.resource(f, email))


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict, bytes, str]:
    """Split a ``multipart/related`` upload into (metadata, media, media content type)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/related") or not match:
        raise DriveError(400, "badContent", "Multipart upload needs a multipart/related body with a boundary.")
    delimiter = b"--" + match.group(1).encode()
    parts = body.split(delimiter)
    # parts[0] is the preamble; the last part starts with "--" (the closing delimiter)
    payloads = []
    for part in parts[1:]:
        if part.startswith(b"--"):
            break
        part = part[2:] if part.startswith(b"\r\n") else part[1:] if part.startswith(b"\n") else part
        crlf, lf = part.find(b"\r\n\r\n"), part.find(b"\n\n")
        sep = b"\r\n\r\n" if crlf != -1 and (lf == -1 or crlf < lf) else b"\n\n"
        head, _, payload = part.partition(sep)
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        elif payload.endswith(b"\n"):
            payload = payload[:-1]
        headers = {}
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        payloads.append((headers, payload))
    if len(payloads) != 2:
        raise DriveError(400, "badContent", "Multipart upload needs exactly a metadata part and a media part.")
    try:
        metadata = json.loads(payloads[0][1] or b"{}")
    except ValueError as e:
        raise DriveError(400, "parseError", "Parse Error") from e
    return metadata, payloads[1][1], payloads[1][0].get("content-type", "application/octet-stream")


class UploadHandler(BaseHandler):
    """``/upload/drive/v2/files[/ID]``: media, multipart and resumable uploads for files.insert and files.update."""

    def post(self, file_id: str | None = None) -> None:
        if file_id is not None:
            raise DriveError(405, "methodNotAllowed", "Use PUT to update a file's content.")
        self.start_or_upload(None)

    def put(self, file_id: str | None = None) -> None:
        if self.get_query_argument("upload_id", None) is not None:
            self.session_chunk()
            return
        if file_id is None:
            raise DriveError(405, "methodNotAllowed", "Use POST to insert a file.")
        self.start_or_upload(file_id)

    def start_or_upload(self, file_id: str | None) -> None:
        email = self.require_account()
        target = self.writable(email, file_id) if file_id else None
        upload_type = self.get_query_argument("uploadType", "")
        content_type = self.request.headers.get("Content-Type", "application/octet-stream")
        if upload_type == "resumable":
            metadata = self.json_body()
            if target is None:
                self.parent_ids(email, metadata)  # fail early, as Drive does, on a parent the caller cannot use
            length = self.request.headers.get("X-Upload-Content-Length")
            session = UploadSession(
                id=new_id(40),
                email=email,
                metadata=metadata,
                file_id=target.id if target else None,
                content_type=self.request.headers.get("X-Upload-Content-Type", "application/octet-stream"),
                total=int(length) if length else None,
            )
            self.world.sessions[session.id] = session
            path = f"/upload/drive/v2/files/{target.id}" if target else "/upload/drive/v2/files"
            self.set_header(
                "Location", f"{self.base_url}{path}?{urlencode({'uploadType': 'resumable', 'upload_id': session.id})}"
            )
            self.send_json({})
            return
        if upload_type == "multipart":
            metadata, data, media_type = _parse_multipart(content_type, self.request.body)
        elif upload_type == "media":
            metadata, data, media_type = {}, self.request.body, content_type
        else:
            raise DriveError(400, "invalid", f"Invalid Value: uploadType={upload_type}")
        self.finish_upload(email, target.id if target else None, metadata, data, media_type)

    def finish_upload(self, email: str, file_id: str | None, metadata: dict, data: bytes, media_type: str) -> DriveFile:
        if file_id is None:
            f = self.create_file(email, metadata, data, media_type)
        else:
            f = self.writable(email, file_id)
            self.apply_metadata(email, f, metadata)
            f.set_content(data)
        self.send_json(self.resource(f, email))
        return f

    def session_chunk(self) -> None:
        session = self.world.sessions.get(self.get_query_argument("upload_id", ""))
        if session is None:
            raise DriveError(404, "notFound", "Upload session not found or expired.")
        self.email = session.email
        if session.result_id is not None:
            # A finished session keeps answering with the file, as Drive does (the client may have lost the reply).
            finished = self.world.files.get(session.result_id)
            if finished is None:
                raise DriveError(404, "notFound", "Upload session not found or expired.")
            self.send_json(self.resource(finished, session.email))
            return
        header = self.request.headers.get("Content-Range")
        body = self.request.body or b""
        if header and header.strip().startswith("bytes */"):
            self.resume_incomplete(session)
            return
        if header:
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", header.strip())
            if not match:
                raise DriveError(400, "invalid", "Failed to parse Content-Range header.")
            start, end = int(match.group(1)), int(match.group(2))
            total = None if match.group(3) == "*" else int(match.group(3))
            if end - start + 1 != len(body) or start > len(session.received):
                raise DriveError(400, "invalid", "Content-Range does not match the bytes sent or the bytes received.")
            if total is not None:
                if session.total is not None and total != session.total:
                    raise DriveError(400, "invalid", "The upload's total size changed.")
                session.total = total
            final = total is not None and end + 1 == total
            if not final and len(body) % CHUNK_GRANULARITY:
                raise DriveError(400, "invalid", "Chunks other than the last must be multiples of 262144 bytes.")
            del session.received[start:]
            session.received.extend(body)
        else:
            session.received.extend(body)
            if session.total is None:
                session.total = len(session.received)
        if session.total is not None and len(session.received) > session.total:
            raise DriveError(400, "invalid", "More bytes received than the declared upload size.")
        if session.total is not None and len(session.received) == session.total:
            data = bytes(session.received)
            session.received = bytearray()
            f = self.finish_upload(session.email, session.file_id, session.metadata, data, session.content_type)
            session.result_id = f.id
            return
        self.resume_incomplete(session)

    def resume_incomplete(self, session: UploadSession) -> None:
        self.set_status(308, "Resume Incomplete")
        if session.received:
            self.set_header("Range", f"bytes=0-{len(session.received) - 1}")
        self.set_header("Content-Length", "0")
        self.finish()


class ControlHandler(BaseHandler):
    """``/_emulator/...``: what tests use to set the world up, inject faults and look inside."""

    def get(self, what: str) -> None:
        if what == "requests":
            self.send_json(self.world.requests)
        elif what == "files":
            email = self.get_query_argument("email", None)
            roots = {a.root_id for a in self.world.accounts.values()}
            self.send_json(
                [
                    {
                        "id": f.id,
                        "title": f.title,
                        "mimeType": f.mime_type,
                        "owner": f.owner,
                        "parents": f.parents,
                        "trashed": f.trashed,
                        "size": None if f.content is None else len(f.content),
                    }
                    for f in self.world.files.values()
                    if f.id not in roots and (email is None or f.owner == email)
                ]
            )
        elif what == "sessions":
            self.send_json(
                [
                    {"id": s.id, "email": s.email, "received": len(s.received)}
                    for s in self.world.sessions.values()
                    if s.result_id is None
                ]
            )
        elif what == "health":
            self.send_json({"ok": True})
        else:
            raise DriveError(404, "notFound", what)

    def delete(self, what: str) -> None:
        if what == "requests":
            self.world.requests.clear()
        elif what == "faults":
            self.world.faults.clear()
        else:
            raise DriveError(404, "notFound", what)
        self.send_json({})

    def post(self, what: str) -> None:
        body = self.json_body()
        world = self.world
        if what == "service_accounts":
            world.service_account_keys[body["client_email"]] = body["public_key_pem"].encode()
            world.account(body["client_email"])
            self.send_json({})
        elif what == "oauth_clients":
            world.oauth_clients[body["client_id"]] = body["client_secret"]
            self.send_json({})
        elif what == "users":
            email, scopes = (
                body["email"],
                frozenset(body.get("scopes") or ["https://www.googleapis.com/auth/drive.file"]),
            )
            world.account(email)
            access, lifetime = world.issue_access_token(email, scopes)
            refresh = world.issue_refresh_token(email, body["client_id"], scopes)
            self.send_json({"access_token": access, "refresh_token": refresh, "expires_in": lifetime})
        elif what == "expire_access_tokens":
            for token in world.access_tokens.values():
                if token.email == body["email"]:
                    token.expires_at = 0
            self.send_json({})
        elif what == "revoke":
            for table in (world.access_tokens, world.refresh_tokens):
                for key in [k for k, v in table.items() if v.email == body["email"]]:
                    del table[key]
            self.send_json({})
        elif what == "share":
            f = world.files[body["file_id"]]
            (f.writers if body.get("role") == "writer" else f.readers).add(body["email"])
            self.send_json({})
        elif what == "settings":
            if "access_token_lifetime_seconds" in body:
                world.access_token_lifetime_seconds = int(body["access_token_lifetime_seconds"])
            self.send_json({})
        elif what == "faults":
            world.faults.append(Fault(**body))
            self.send_json({})
        elif what == "reset":
            self.world.__init__()  # type: ignore[misc]
            self.send_json({})
        else:
            raise DriveError(404, "notFound", what)


def make_app(world: World | None = None) -> web.Application:
    """The emulator's tornado application over ``world`` (a fresh one by default)."""
    args = {"world": world or World()}
    return web.Application(
        [
            (r"/token", TokenHandler, args),
            (r"/discovery/v1/apis/drive/v2/rest", DiscoveryHandler, args),
            (r"/oauth2/v1/userinfo", UserInfoHandler, args),
            (r"/drive/v2/about", AboutHandler, args),
            (r"/drive/v2/files", FilesHandler, args),
            (r"/drive/v2/files/([^/]+)", FileHandler, args),
            (r"/drive/v2/files/([^/]+)/(trash|untrash)", FileActionHandler, args),
            (r"/upload/drive/v2/files", UploadHandler, args),
            (r"/upload/drive/v2/files/([^/]+)", UploadHandler, args),
            (r"/_emulator/([a-z_]+)", ControlHandler, args),
        ]
    )
