"""DOLAB_SYNC_* settings and the shipped config's registration of the service."""

from __future__ import annotations

import pytest

from dolab_services.sync.config import SyncSettings, user_prefix
from dolab_services.sync.registration import sync_service


def test_no_bucket_means_no_backups() -> None:
    assert not SyncSettings.from_env({}).enabled
    assert sync_service({}, "/ws", "/data") is None


def test_settings_from_env() -> None:
    s = SyncSettings.from_env(
        {
            "DOLAB_SYNC_S3_BUCKET": "team",
            "DOLAB_SYNC_S3_PREFIX": "/backups/",
            "DOLAB_SYNC_KEEP": "3",
            "DOLAB_SYNC_DELETIONS": "keep",
            "DOLAB_SYNC_EXCLUDE": "*.tmp, data/raw/*",
            "DOLAB_SYNC_MAX_FILE_MB": "1.5",
            "DOLAB_SYNC_S3_SECRET_ACCESS_KEY": "s3cr3t",
        }
    )
    policy = s.policy()
    assert (s.bucket, s.prefix, policy.keep_snapshots, policy.deletions) == ("team", "backups", 3, "keep")
    assert policy.excludes.globs == ("*.tmp", "data/raw/*")
    assert policy.excludes.max_file_bytes == 1572864
    assert "s3cr3t" not in repr(s)
    assert s.store_for("Alice.Smith@x").description == "s3://team/backups/-41lice-2E-53mith-40x"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DOLAB_SYNC_KEEP": "0"}, "at least 1"),
        ({"DOLAB_SYNC_DELETIONS": "purge"}, "mirror or keep"),
        ({"DOLAB_SYNC_MAX_FILE_MB": "lots"}, "must be a number"),
        ({"DOLAB_SYNC_PORT": "http"}, "TCP port"),
    ],
    ids=["keep", "deletions", "cap", "port"],
)
def test_bad_settings_are_sentences(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sync_service({"DOLAB_SYNC_S3_BUCKET": "b", **env}, "/ws", "/data")


def test_user_prefixes_cannot_collide_or_climb() -> None:
    names = ["alice", "Alice", "al-ice", "al.ice", "../alice", "alice/..", "a/b"]
    prefixes = [user_prefix(n) for n in names]
    assert len(set(prefixes)) == len(names)
    assert all(p and set(p) <= set("abcdefghijklmnopqrstuvwxyz0123456789ABCDEF-") for p in prefixes)


def test_registration_passes_secrets_to_the_service_only() -> None:
    env = {
        "DOLAB_SYNC_S3_BUCKET": "team",
        "DOLAB_SYNC_S3_SECRET_ACCESS_KEY": "s3cr3t",
        "DOLAB_SYNC_PORT": "10999",
        "UNRELATED": "x",
    }
    reg = sync_service(env, "/srv/ws", "/srv/data", "/usr/bin/python3")
    assert reg is not None
    assert reg.service["environment"]["DOLAB_SYNC_S3_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert "UNRELATED" not in reg.service["environment"]
    assert reg.service["environment"]["DOLAB_WORKSPACE_ROOT"] == "/srv/ws"
    assert reg.service["url"] == "http://127.0.0.1:10999"
    assert reg.role["scopes"] == ["list:users", "read:users:name", "read:servers", "admin:server_state"]
    assert reg.extra_user_scopes == {"access:services!service=dolab-sync"}
