"""The Drive emulator as the real SDKs see it: pydrive2, googleapiclient with google-auth, and raw HTTP."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any

import httplib2
import jwt
import pytest
import requests
from google.auth.exceptions import RefreshError
from google.oauth2 import service_account
from google.oauth2.credentials import Credentials
from google_auth_httplib2 import AuthorizedHttp
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError
from googleapiclient.http import MediaIoBaseDownload, MediaIoBaseUpload
from pydrive2.auth import GoogleAuth
from pydrive2.drive import GoogleDrive
from pydrive2.files import ApiRequestError

from tests.drive_emulator import DriveEmulatorClient
from tests.drive_emulator.query import FileView, QueryError, compile_query

FOLDER = "application/vnd.google-apps.folder"
DRIVE_FILE = "https://www.googleapis.com/auth/drive.file"


def discovery_url(drive: DriveEmulatorClient) -> str:
    return f"{drive.url}/discovery/v1/apis/{{api}}/{{apiVersion}}/rest"


def pydrive(drive: DriveEmulatorClient, key_file: Path) -> GoogleDrive:
    """pydrive2 as documented for service accounts; only the service is built from the emulator's discovery URL."""
    auth = GoogleAuth(
        settings={
            "client_config_backend": "service",
            "service_config": {"client_json_file_path": str(key_file)},
            "oauth_scope": [DRIVE_FILE],
        }
    )
    auth.ServiceAuth()
    auth.service = build(
        "drive",
        "v2",
        http=auth.http,
        discoveryServiceUrl=discovery_url(drive),
        static_discovery=False,
        cache_discovery=False,
    )
    return GoogleDrive(auth)


def api_for_user(drive: DriveEmulatorClient, email: str, scopes: list[str] | None = None) -> Any:
    """googleapiclient + google-auth user credentials (refresh token only: the first call refreshes)."""
    drive.oauth_client("client-1", "secret-1")
    grant = drive.user_grant(email, "client-1", "secret-1", scopes=scopes)
    creds = Credentials(
        token=None,
        refresh_token=grant.refresh_token,
        client_id="client-1",
        client_secret="secret-1",
        token_uri=drive.token_uri,
        scopes=scopes or [DRIVE_FILE],
    )
    http = httplib2.Http(timeout=30)
    http.redirect_codes = http.redirect_codes - {308}  # 308 is Resume Incomplete for Drive uploads
    return build(
        "drive",
        "v2",
        http=AuthorizedHttp(creds, http=http),
        discoveryServiceUrl=discovery_url(drive),
        static_discovery=False,
        cache_discovery=False,
    )


@pytest.fixture
def key_file(drive: DriveEmulatorClient, tmp_path: Path) -> Path:
    return drive.service_account("sa@dolab-test.iam.gserviceaccount.com").write_key_file(tmp_path / "sa.json")


def test_pydrive2_service_account_file_lifecycle(drive: DriveEmulatorClient, key_file: Path, tmp_path: Path) -> None:
    gd = pydrive(drive, key_file)
    folder = gd.CreateFile({"title": "Ünïcødé folder", "mimeType": FOLDER})
    folder.Upload()
    note = gd.CreateFile({"title": "it's — ü.txt", "parents": [{"id": folder["id"]}]})
    note.SetContentString("héllo wörld")
    note.Upload()
    assert note["md5Checksum"] == hashlib.md5("héllo wörld".encode()).hexdigest()
    assert note["fileSize"] == str(len("héllo wörld".encode()))
    assert note["parents"][0]["id"] == folder["id"]

    query = f"title = 'it\\'s — ü.txt' and '{folder['id']}' in parents and trashed = false"
    (found,) = gd.ListFile({"q": query}).GetList()
    assert found["id"] == note["id"]
    assert gd.CreateFile({"id": note["id"]}).GetContentString() == "héllo wörld"
    assert [f["title"] for f in gd.ListFile({"q": f"'root' in parents and mimeType = '{FOLDER}'"}).GetList()] == [
        "Ünïcødé folder"
    ]

    # Update the content from a file (pydrive2 uses a resumable upload on files.update), then download it.
    binary = bytes(range(256)) * 300
    (tmp_path / "in.bin").write_bytes(binary)
    note.SetContentFile(str(tmp_path / "in.bin"))
    note.Upload()
    assert note["md5Checksum"] == hashlib.md5(binary).hexdigest()
    gd.CreateFile({"id": note["id"]}).GetContentFile(str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == binary
    assert any(r["method"] == "PUT" and r["path"] == f"/upload/drive/v2/files/{note['id']}" for r in drive.requests())

    # Metadata-only changes go through files.patch; about.get names the account's root folder.
    note["title"] = "renamed.txt"
    note.Upload()
    assert any(r["method"] == "PATCH" for r in drive.requests())
    renamed = gd.ListFile({"q": "title = 'renamed.txt'"}).GetList()
    assert [f["id"] for f in renamed] == [note["id"]]
    assert folder["parents"][0]["id"] == gd.GetAbout()["rootFolderId"]
    query = f"title = 'renamed.txt' and '{folder['id']}' in parents and trashed = false"

    note.Trash()
    assert gd.ListFile({"q": query}).GetList() == []
    note.UnTrash()
    assert len(gd.ListFile({"q": query}).GetList()) == 1
    folder.Trash()  # trashing a folder trashes what is inside
    assert gd.ListFile({"q": query}).GetList() == []
    folder.Delete()
    with pytest.raises(ApiRequestError) as info:
        gd.CreateFile({"id": note["id"]}).FetchMetadata()
    assert info.value.error["code"] == 404


def test_pydrive2_pagination(drive: DriveEmulatorClient, key_file: Path) -> None:
    gd = pydrive(drive, key_file)
    for i in range(5):
        f = gd.CreateFile({"title": f"f{i}"})
        f.SetContentString(str(i))
        f.Upload()
    pages = list(gd.ListFile({"q": "trashed = false", "maxResults": 2}))
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(f["title"] for p in pages for f in p) == [f"f{i}" for i in range(5)]
    assert len(gd.ListFile({"q": "title contains 'F'"}).GetList()) == 5


def test_googleapiclient_uploads_and_downloads(drive: DriveEmulatorClient) -> None:
    api = api_for_user(drive, "alice@example.org")
    data = bytes(range(256)) * 4000 + b"\r\n--\r\n"  # ends like a multipart delimiter would
    small = api.files().insert(
        body={"title": "small.bin"}, media_body=MediaIoBaseUpload(io.BytesIO(data), "application/octet-stream")
    )
    small = small.execute()
    assert small["md5Checksum"] == hashlib.md5(data).hexdigest()
    assert any("uploadType=multipart" in r["query"] for r in drive.requests())

    drive.clear_requests()
    media = MediaIoBaseUpload(io.BytesIO(data), "application/octet-stream", chunksize=256 * 1024, resumable=True)
    big = api.files().insert(body={"title": "big.bin"}, media_body=media).execute()
    assert big["fileSize"] == str(len(data))
    puts = [r for r in drive.requests() if r["method"] == "PUT"]
    assert [r["status"] for r in puts] == [308, 308, 308, 200]
    assert puts[1]["content_range"] == f"bytes 262144-524287/{len(data)}"

    buffer = io.BytesIO()
    downloader = MediaIoBaseDownload(buffer, api.files().get_media(fileId=big["id"]), chunksize=100_000)
    done, chunks = False, 0
    while not done:
        _, done = downloader.next_chunk()
        chunks += 1
    assert buffer.getvalue() == data and chunks == 11

    empty = api.files().insert(body={"title": "empty"}, media_body=MediaIoBaseUpload(io.BytesIO(b""), "text/plain"))
    empty = empty.execute()
    buffer = io.BytesIO()
    _, done = MediaIoBaseDownload(buffer, api.files().get_media(fileId=empty["id"])).next_chunk()
    assert done and buffer.getvalue() == b""


def test_resumable_protocol_details(drive: DriveEmulatorClient) -> None:
    api = api_for_user(drive, "alice@example.org")
    token = api._http.credentials.token
    headers = {"Authorization": f"Bearer {token}"}
    start = requests.post(
        f"{drive.url}/upload/drive/v2/files?uploadType=resumable",
        json={"title": "r.bin"},
        headers={**headers, "X-Upload-Content-Type": "application/octet-stream", "X-Upload-Content-Length": "300000"},
        timeout=30,
    )
    session = start.headers["Location"]
    status = requests.put(session, headers={"Content-Range": "bytes */300000"}, timeout=30)
    assert status.status_code == 308 and "Range" not in status.headers
    odd = requests.put(session, data=b"x" * 1000, headers={"Content-Range": "bytes 0-999/300000"}, timeout=30)
    assert odd.status_code == 400  # a non-final chunk must be a multiple of 256 KiB
    part = requests.put(session, data=b"a" * 262144, headers={"Content-Range": "bytes 0-262143/300000"}, timeout=30)
    assert part.status_code == 308 and part.headers["Range"] == "bytes=0-262143"
    rest = requests.put(
        session, data=b"b" * (300000 - 262144), headers={"Content-Range": "bytes 262144-299999/300000"}, timeout=30
    )
    assert rest.status_code == 200 and rest.json()["fileSize"] == "300000"
    # Asking a finished session how far it got answers with the file (a client that lost the last reply).
    done = requests.put(session, headers={"Content-Range": "bytes */300000"}, timeout=30)
    assert done.status_code == 200 and done.json()["id"] == rest.json()["id"]


def test_token_endpoint_refuses_bad_grants(drive: DriveEmulatorClient) -> None:
    drive.oauth_client("client-1", "secret-1")
    grant = drive.user_grant("alice@example.org", "client-1", "secret-1")
    token_uri = drive.token_uri

    def refresh(**form: str) -> requests.Response:
        return requests.post(token_uri, data={"grant_type": "refresh_token", **form}, timeout=30)

    ok = refresh(client_id="client-1", client_secret="secret-1", refresh_token=grant.refresh_token)
    assert ok.status_code == 200 and ok.json()["token_type"] == "Bearer"
    assert refresh(client_id="client-1", client_secret="wrong", refresh_token=grant.refresh_token).json()["error"] == (
        "invalid_client"
    )
    assert refresh(client_id="client-1", client_secret="secret-1", refresh_token="1//forged").json()["error"] == (
        "invalid_grant"
    )
    drive.revoke("alice@example.org")
    revoked = refresh(client_id="client-1", client_secret="secret-1", refresh_token=grant.refresh_token)
    assert (revoked.status_code, revoked.json()["error"]) == (400, "invalid_grant")
    assert requests.post(token_uri, data={"grant_type": "password"}, timeout=30).status_code == 400

    creds = Credentials(
        None, refresh_token=grant.refresh_token, client_id="client-1", client_secret="secret-1", token_uri=token_uri
    )
    with pytest.raises(RefreshError, match="invalid_grant"):
        creds.refresh(google_request())


def google_request() -> Any:
    import google.auth.transport.requests

    return google.auth.transport.requests.Request()


def test_jwt_bearer_grant_checks_signature_audience_and_time(drive: DriveEmulatorClient) -> None:
    account = drive.service_account("sa@dolab-test.iam.gserviceaccount.com")
    # google-auth signs its own assertion (audience: Google's token URL) and gets a token.
    creds = service_account.Credentials.from_service_account_info(account.key, scopes=[DRIVE_FILE])
    creds.refresh(google_request())
    assert creds.token

    now = int(time.time())
    claims = {"iss": account.email, "scope": DRIVE_FILE, "aud": drive.token_uri, "iat": now, "exp": now + 3600}

    def grant(payload: dict, key: str = account.key["private_key"]) -> requests.Response:
        assertion = jwt.encode(payload, key, algorithm="RS256")
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
        return requests.post(drive.token_uri, data=form, timeout=30)

    assert grant(claims).status_code == 200
    assert grant({**claims, "iat": now - 7200, "exp": now - 3600}).json()["error"] == "invalid_grant"
    assert grant({**claims, "aud": "https://example.org/token"}).json()["error"] == "invalid_grant"
    other = drive.service_account("other@dolab-test.iam.gserviceaccount.com")
    assert grant(claims, key=other.key["private_key"]).json()["error_description"] == "Invalid JWT Signature."


def test_api_checks_bearer_tokens_and_scopes(drive: DriveEmulatorClient) -> None:
    url = f"{drive.url}/drive/v2/files"
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=30).json()["error"]["message"] == (
        "Invalid Credentials"
    )
    api = api_for_user(drive, "alice@example.org", scopes=["https://www.googleapis.com/auth/calendar"])
    with pytest.raises(HttpError) as info:
        api.files().list().execute()
    assert info.value.resp.status == 403


def test_accounts_are_isolated_until_shared(drive: DriveEmulatorClient) -> None:
    alice, bob = api_for_user(drive, "alice@example.org"), api_for_user(drive, "bob@example.org")
    folder = alice.files().insert(body={"title": "private", "mimeType": FOLDER}).execute()
    assert bob.files().list(q="trashed = false").execute()["items"] == []
    for call in (
        bob.files().get(fileId=folder["id"]),
        bob.files().delete(fileId=folder["id"]),
        bob.files().insert(body={"title": "x", "parents": [{"id": folder["id"]}]}),
    ):
        with pytest.raises(HttpError) as info:
            call.execute()
        assert info.value.resp.status == 404
    drive.share(folder["id"], "bob@example.org")
    assert [f["title"] for f in bob.files().list(q="title = 'private'").execute()["items"]] == ["private"]
    with pytest.raises(HttpError) as info:
        bob.files().delete(fileId=folder["id"]).execute()
    assert info.value.resp.status == 403


def test_faults_reach_the_client(drive: DriveEmulatorClient) -> None:
    api = api_for_user(drive, "alice@example.org")
    drive.add_fault(429, method="GET", path="^/drive/v2/files$", retry_after=7)
    with pytest.raises(HttpError) as info:
        api.files().list().execute()
    assert (info.value.resp.status, info.value.resp["retry-after"]) == (429, "7")
    assert api.files().list().execute()["items"] == []  # one time only
    drive.add_fault(503, path="^/drive/v2/files$", times=2)
    assert api.files().list().execute(num_retries=2)["items"] == []  # googleapiclient's own retries get through


def test_discovery_document_points_at_the_emulator(drive: DriveEmulatorClient) -> None:
    doc = requests.get(f"{drive.url}/discovery/v1/apis/drive/v2/rest", timeout=30).json()
    assert doc["rootUrl"] == f"{drive.url}/" and doc["servicePath"] == "drive/v2/"


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("title = 'a b'", True),
        ("title != 'a b'", False),
        ("title contains 'A'", True),
        ("'p1' in parents and trashed = false", True),
        ("'p2' in parents", False),
        ("not trashed = true", True),
        ("(title = 'x' or mimeType = 'text/plain') and 'me@x' in owners", True),
        ("mimeType != 'text/plain'", False),
        ("title = 'it\\'s'", False),
    ],
    ids=lambda v: str(v),
)
def test_query_language(q: str, expected: bool) -> None:
    view = FileView(
        title="a b",
        mime_type="text/plain",
        trashed=False,
        parents=frozenset({"p1"}),
        owners=frozenset({"me@x"}),
        writers=frozenset({"me@x"}),
        readers=frozenset({"me@x"}),
    )
    assert compile_query(q)(view) is expected


@pytest.mark.parametrize("q", ["title = ", "title ~ 'x'", "'x' in children", "modifiedDate > '2020'", "(title = 'x'"])
def test_query_language_rejects(q: str) -> None:
    with pytest.raises(QueryError):
        compile_query(q)
