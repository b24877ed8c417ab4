"""DriveStore (dolab_services.sync.drive) on the real pydrive2/googleapiclient against the Drive emulator."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from traitlets.config import Config

from dolab_services.sync.drive import DriveSettings, DriveStore, DriveTarget
from dolab_services.sync.drive_auth import ServiceAccountKey, UserToken
from dolab_services.sync.store import ObjectNotFound, ObjectStore, StoreError
from tests.drive_emulator import DriveEmulatorClient

MIB = 1024 * 1024
CLIENT_ID = "dolab-hub.apps.googleusercontent.com"
CLIENT_SECRET = "hub-client-secret"


def fast(drive: DriveEmulatorClient, **overrides: object) -> DriveSettings:
    """Settings pointing at the emulator, with 1 MiB chunks and short backoff (retries still happen)."""
    values: dict = {
        "api_root_url": drive.url,
        "chunk_size_bytes": 1 * MIB,
        "timeout_seconds": 30.0,
        "backoff_base_seconds": 0.01,
    }
    values.update(overrides)
    return DriveSettings(**values)


@pytest.fixture
def key_file(drive: DriveEmulatorClient, tmp_path: Path) -> Path:
    """A service account registered with the emulator, its JSON key written to disk."""
    account = drive.service_account("dolab-backup@dolab-test.iam.gserviceaccount.com")
    return account.write_key_file(tmp_path / "service-account.json")


def user_token(drive: DriveEmulatorClient, email: str, expired: bool = False) -> UserToken:
    """What the authenticator would hand over after a Google login with the drive.file scope."""
    drive.oauth_client(CLIENT_ID, CLIENT_SECRET)
    grant = drive.user_grant(email, CLIENT_ID, CLIENT_SECRET)
    expires_at = datetime.now(timezone.utc) + timedelta(seconds=-60 if expired else grant.expires_in)
    return UserToken(
        access_token=grant.access_token,
        refresh_token=grant.refresh_token,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        expires_at=expires_at,
        token_uri=drive.token_uri,
    )


def token_requests(drive: DriveEmulatorClient) -> list[dict]:
    return [r for r in drive.requests() if r["path"] == "/token"]


def test_is_an_object_store(drive: DriveEmulatorClient, key_file: Path) -> None:
    store = DriveStore("alice", ServiceAccountKey(key_file), fast(drive))
    assert isinstance(store, ObjectStore)
    assert store.description == "Google Drive folder DO-LAB backups/alice"


def test_round_trip_nested_binary_and_listing(drive: DriveEmulatorClient, key_file: Path, tmp_path: Path) -> None:
    store = DriveStore("zoë Ünïcødé", ServiceAccountKey(key_file), fast(drive))
    binary = bytes(range(256)) * 1000 + b"\x00\r\n\xff"
    source = tmp_path / "blob.bin"
    source.write_bytes(binary)
    blob_key = "blobs/" + hashlib.sha256(binary).hexdigest()[:2] + "/" + hashlib.sha256(binary).hexdigest()
    store.put_file(blob_key, source)
    store.put_bytes("snapshots/20261126T080000000000Z.json.gz", b"manifest one")
    store.put_bytes("a/b/c/d/e.txt", b"")

    assert store.get_bytes(blob_key) == binary
    assert store.get_bytes("a/b/c/d/e.txt") == b""
    out = tmp_path / "out.bin"
    store.get_file(blob_key, out)
    assert out.read_bytes() == binary

    listed = {info.key: info.size for info in store.list()}
    assert listed == {blob_key: len(binary), "snapshots/20261126T080000000000Z.json.gz": 12, "a/b/c/d/e.txt": 0}
    assert [info.key for info in store.list("snapshots/")] == ["snapshots/20261126T080000000000Z.json.gz"]
    assert list(store.list("nothing/")) == []

    # One folder per user, under the root folder, named exactly after the (unicode) user name.
    files = {f["title"]: f for f in drive.files()}
    assert files["zoë Ünïcødé"]["mimeType"] == "application/vnd.google-apps.folder"
    assert files["zoë Ünïcødé"]["parents"] == [files["DO-LAB backups"]["id"]]
    assert files[blob_key]["parents"] == [files["zoë Ünïcødé"]["id"]]
    # A fresh store (a new process) finds the same folders instead of creating new ones.
    again = DriveStore("zoë Ünïcødé", ServiceAccountKey(key_file), fast(drive))
    assert again.get_bytes("snapshots/20261126T080000000000Z.json.gz") == b"manifest one"
    assert sum(f["mimeType"].endswith("folder") for f in drive.files()) == 2


def test_put_replaces_and_delete(drive: DriveEmulatorClient, key_file: Path) -> None:
    store = DriveStore("alice", ServiceAccountKey(key_file), fast(drive))
    store.put_bytes("snapshots/x.json.gz", b"old")
    store.put_bytes("snapshots/x.json.gz", b"new content")
    assert store.get_bytes("snapshots/x.json.gz") == b"new content"
    assert [f["title"] for f in drive.files()].count("snapshots/x.json.gz") == 1
    # Another store instance (no cache) replaces too, and sees the new content.
    other = DriveStore("alice", ServiceAccountKey(key_file), fast(drive))
    other.put_bytes("snapshots/x.json.gz", b"newest")
    assert store.get_bytes("snapshots/x.json.gz") in (b"newest",)

    store.put_bytes("blobs/aa/keep", b"k")
    store.delete(["snapshots/x.json.gz", "blobs/zz/never-existed"])
    with pytest.raises(ObjectNotFound):
        store.get_bytes("snapshots/x.json.gz")
    with pytest.raises(ObjectNotFound):
        other.get_bytes("snapshots/x.json.gz")
    assert [i.key for i in store.list()] == ["blobs/aa/keep"]
    assert "snapshots/x.json.gz" not in [f["title"] for f in drive.files()]


def test_delete_many_after_listing(drive: DriveEmulatorClient, key_file: Path) -> None:
    store = DriveStore("alice", ServiceAccountKey(key_file), fast(drive))
    keys = [f"blobs/{i:02x}/blob{i}" for i in range(30)]
    for key in keys:
        store.put_bytes(key, key.encode())
    store.delete(keys[:25])
    assert sorted(i.key for i in store.list()) == sorted(keys[25:])


def test_invalid_keys_are_refused(drive: DriveEmulatorClient, key_file: Path) -> None:
    store = DriveStore("alice", ServiceAccountKey(key_file), fast(drive))
    for bad in ("../x", "/abs", "a//b", "ü"):
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"x")


def test_large_file_goes_up_resumably_in_chunks(drive: DriveEmulatorClient, key_file: Path, tmp_path: Path) -> None:
    store = DriveStore("alice", ServiceAccountKey(key_file), fast(drive, chunk_size_bytes=8 * MIB))
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(50):
            f.write(os.urandom(MIB))
        f.write(b"tail")
    size = big.stat().st_size
    drive.clear_requests()
    store.put_file("blobs/bb/big", big)

    chunks = [r for r in drive.requests() if r["method"] == "PUT" and "upload_id" in r["query"]]
    assert len(chunks) == 7  # 6 x 8 MiB + the rest
    assert [r["status"] for r in chunks] == [308] * 6 + [200]
    assert chunks[0]["content_range"] == f"bytes 0-{8 * MIB - 1}/{size}"
    assert chunks[-1]["content_range"] == f"bytes {48 * MIB}-{size - 1}/{size}"
    assert max(r["body_bytes"] for r in chunks) == 8 * MIB

    out = tmp_path / "back.bin"
    store.get_file("blobs/bb/big", out)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
    assert [(i.key, i.size) for i in store.list()] == [("blobs/bb/big", size)]


def test_rate_limits_and_server_errors_are_retried(drive: DriveEmulatorClient, key_file: Path, tmp_path: Path) -> None:
    store = DriveStore("alice", ServiceAccountKey(key_file), fast(drive))
    drive.add_fault(429, method="GET", path="^/drive/v2/files$", retry_after=1, times=1)
    drive.add_fault(503, method="POST", path="^/upload/", times=2)
    drive.add_fault(500, method="PUT", path="^/upload/", query="upload_id", skip=1, times=1)
    drive.add_fault(502, method="GET", path="^/drive/v2/files/", times=1)
    drive.add_fault(502, method="GET", path="^/drive/v2/files$", skip=2, html=True)  # not JSON: pydrive2 chokes
    data = os.urandom(3 * MIB + 5)
    source = tmp_path / "d.bin"
    source.write_bytes(data)
    store.put_file("blobs/cc/d", source)
    assert store.get_bytes("blobs/cc/d") == data

    statuses = [(r["method"], r["path"].split("/")[1], r["status"]) for r in drive.requests()]
    assert ("GET", "drive", 429) in statuses
    assert statuses.count(("POST", "upload", 503)) == 2
    assert ("PUT", "upload", 500) in statuses
    assert ("GET", "drive", 502) in statuses
    assert any(r["path"] == "/drive/v2/files" and r["status"] == 502 for r in drive.requests())
    # After the failed chunk the client asked Drive how far it got (bytes */N) and went on from there.
    assert any(r["content_range"] == f"bytes */{len(data)}" for r in drive.requests())


def test_dropped_upload_session_starts_over(drive: DriveEmulatorClient, key_file: Path, tmp_path: Path) -> None:
    store = DriveStore("alice", ServiceAccountKey(key_file), fast(drive))
    data = os.urandom(4 * MIB)
    source = tmp_path / "d.bin"
    source.write_bytes(data)
    drive.add_fault(method="PUT", path="^/upload/", query="upload_id", skip=2, action="drop_session")
    store.put_file("blobs/dd/d", source)
    assert store.get_bytes("blobs/dd/d") == data
    starts = [r for r in drive.requests() if r["method"] == "POST" and r["path"].startswith("/upload/")]
    assert len(starts) == 2
    assert drive.sessions() == [] and [f["title"] for f in drive.files()].count("blobs/dd/d") == 1


def test_failed_upload_leaves_the_old_object(drive: DriveEmulatorClient, key_file: Path, tmp_path: Path) -> None:
    store = DriveStore("alice", ServiceAccountKey(key_file), fast(drive, max_retries=2))
    store.put_bytes("snapshots/s.json.gz", b"previous")
    source = tmp_path / "d.bin"
    source.write_bytes(os.urandom(3 * MIB))
    drive.add_fault(503, method="PUT", path="^/upload/", query="upload_id", skip=1, times=100)
    with pytest.raises(StoreError, match=r"Google Drive answered HTTP 503 while uploading blobs/ee/new"):
        store.put_file("blobs/ee/new", source)
    with pytest.raises(StoreError):
        store.put_file("snapshots/s.json.gz", source)
    drive.clear_faults()
    assert store.get_bytes("snapshots/s.json.gz") == b"previous"
    assert [i.key for i in DriveStore("alice", ServiceAccountKey(key_file), fast(drive)).list()] == [
        "snapshots/s.json.gz"
    ]


def test_user_token_refreshed_when_expired(drive: DriveEmulatorClient) -> None:
    token = user_token(drive, "alice@example.org", expired=True)
    drive.expire_access_tokens("alice@example.org")  # the stored access token really is dead
    store = DriveStore("alice", token, fast(drive))
    store.put_bytes("snapshots/a.json.gz", b"hello")
    assert len(token_requests(drive)) == 1
    # The backups live in alice's own Drive.
    assert {f["owner"] for f in drive.files()} == {"alice@example.org"}

    # Google revokes the access token early: the 401 triggers a refresh and the call goes through.
    drive.expire_access_tokens("alice@example.org")
    assert store.get_bytes("snapshots/a.json.gz") == b"hello"
    assert len(token_requests(drive)) == 2
    assert any(r["status"] == 401 for r in drive.requests())


def test_user_token_without_expiry_is_used_as_is(drive: DriveEmulatorClient) -> None:
    token = user_token(drive, "alice@example.org")
    store = DriveStore("alice", token, fast(drive))
    store.put_bytes("x", b"1")
    assert token_requests(drive) == []


def test_revoked_user_token_gives_the_sentence(drive: DriveEmulatorClient) -> None:
    token = user_token(drive, "alice@example.org", expired=True)
    drive.revoke("alice@example.org")
    store = DriveStore("alice", token, fast(drive))
    with pytest.raises(StoreError) as info:
        store.put_bytes("x", b"1")
    assert str(info.value) == (
        "Google Drive refused the stored credentials of alice; sign in to DO-LAB again with Google to renew them."
    )
    assert token.refresh_token not in str(info.value)


def test_wrong_client_secret_gives_the_sentence(drive: DriveEmulatorClient) -> None:
    token = user_token(drive, "alice@example.org", expired=True)
    bad = UserToken(
        access_token=None,
        refresh_token=token.refresh_token,
        client_id=CLIENT_ID,
        client_secret="not-the-secret",
        token_uri=drive.token_uri,
    )
    with pytest.raises(StoreError, match="refused the stored credentials of alice; sign in"):
        list(DriveStore("alice", bad, fast(drive)).list())


def test_bad_service_account_keys_give_the_sentence(drive: DriveEmulatorClient, tmp_path: Path) -> None:
    unregistered = drive.service_account("gone@dolab-test.iam.gserviceaccount.com")
    drive.reset()  # Google no longer knows the account
    key = unregistered.write_key_file(tmp_path / "gone.json")
    with pytest.raises(StoreError, match="refused the sync service's service account credentials; an admin must"):
        DriveStore("alice", ServiceAccountKey(key), fast(drive)).put_bytes("x", b"1")

    # A key whose private half does not match the registered public key.
    real = drive.service_account("real@dolab-test.iam.gserviceaccount.com")
    forged = drive.service_account("other@dolab-test.iam.gserviceaccount.com")
    mixed = dict(real.key, private_key=forged.key["private_key"])
    (tmp_path / "forged.json").write_text(__import__("json").dumps(mixed))
    with pytest.raises(StoreError, match="refused the sync service's service account credentials"):
        list(DriveStore("alice", ServiceAccountKey(tmp_path / "forged.json"), fast(drive)).list())

    with pytest.raises(StoreError, match="service account key could not be read; an admin must check"):
        DriveStore("alice", ServiceAccountKey(tmp_path / "missing.json"), fast(drive))
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(StoreError, match="service account key could not be read"):
        DriveStore("alice", ServiceAccountKey(tmp_path / "garbage.json"), fast(drive))


def test_one_account_cannot_see_anothers_backups(drive: DriveEmulatorClient) -> None:
    alice = DriveStore("alice", user_token(drive, "alice@example.org"), fast(drive))
    alice.put_bytes("snapshots/secret.json.gz", b"alice's work")
    alice_folder = next(f for f in drive.files() if f["title"] == "alice")

    # Bob's own store, even with the same user folder name, is a different folder in a different Drive.
    bob_as_alice = DriveStore("alice", user_token(drive, "bob@example.org"), fast(drive))
    assert list(bob_as_alice.list()) == []
    with pytest.raises(ObjectNotFound):
        bob_as_alice.get_bytes("snapshots/secret.json.gz")

    # Pointed at alice's folder by id, bob is refused and cannot write into it.
    intruder = DriveStore("x", user_token(drive, "bob@example.org"), fast(drive, folder_id=alice_folder["id"]))
    with pytest.raises(StoreError, match="found no such file or folder while creating the folder x in Google Drive"):
        intruder.put_bytes("snapshots/evil.json.gz", b"x")
    assert [f["title"] for f in drive.files("alice@example.org") if f["parents"] == [alice_folder["id"]]] == [
        "snapshots/secret.json.gz"
    ]
    assert alice.get_bytes("snapshots/secret.json.gz") == b"alice's work"


def test_target_from_config(drive: DriveEmulatorClient, key_file: Path) -> None:
    config = Config()
    config.DriveTarget.api_root_url = drive.url
    config.DriveTarget.folder_name = "Team backups"
    config.DriveTarget.chunk_size_mb = 1
    target = DriveTarget(config=config)
    with pytest.raises(StoreError, match="needs alice to sign in to DO-LAB with Google"):
        target.store_for("alice")
    store = target.store_for("alice", user_token(drive, "alice@example.org"))
    store.put_bytes("x", b"1")
    assert store.description == "Google Drive folder Team backups/alice"

    config.DriveTarget.service_account_key_file = str(key_file)
    shared = DriveTarget(config=config).store_for("bob")
    shared.put_bytes("x", b"2")
    assert {f["title"]: f["owner"] for f in drive.files()}["bob"] == "dolab-backup@dolab-test.iam.gserviceaccount.com"


def test_a_hung_server_times_out_and_is_retried(drive: DriveEmulatorClient, key_file: Path) -> None:
    store = DriveStore("alice", ServiceAccountKey(key_file), fast(drive, timeout_seconds=1.0, max_retries=0))
    store.put_bytes("x", b"1")
    drive.add_fault(method="GET", path="^/drive/v2/files$", action="delay", delay_seconds=8)
    with pytest.raises(StoreError, match=r"could not be reached while listing the backup \(TimeoutError\)"):
        list(store.list())
    patient = DriveStore("alice", ServiceAccountKey(key_file), fast(drive, timeout_seconds=1.0, max_retries=1))
    drive.add_fault(method="GET", path="^/drive/v2/files$", action="delay", delay_seconds=8, skip=2)
    assert [i.key for i in patient.list()] == ["x"]


def test_a_lost_reply_to_the_last_chunk_makes_no_duplicate(
    drive: DriveEmulatorClient, key_file: Path, tmp_path: Path
) -> None:
    store = DriveStore("alice", ServiceAccountKey(key_file), fast(drive, timeout_seconds=1.0))
    data = os.urandom(3 * MIB)
    source = tmp_path / "d.bin"
    source.write_bytes(data)
    drive.add_fault(method="PUT", path="^/upload/", query="upload_id", skip=2, action="delay", delay_seconds=4)
    store.put_file("blobs/ff/d", source)
    assert store.get_bytes("blobs/ff/d") == data
    assert [f["title"] for f in drive.files()].count("blobs/ff/d") == 1
    assert any(r["content_range"] == f"bytes */{len(data)}" for r in drive.requests())
