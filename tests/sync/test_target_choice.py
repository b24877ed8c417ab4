"""The admin's target policy (DOLAB_SYNC_TARGETS, DOLAB_SYNC_DRIVE_AUTH), users' choices kept on disk, and the
scopes the service's role gets for each mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from dolab_services.sync.backups import Backups
from dolab_services.sync.choices import TargetChoices, choices_path
from dolab_services.sync.config import SyncSettings
from dolab_services.sync.registration import sync_service

S3 = {"DOLAB_SYNC_S3_BUCKET": "team"}
DRIVE_USER = {"DOLAB_SYNC_DRIVE_AUTH": "user"}
BOTH = {**S3, **DRIVE_USER, "DOLAB_SYNC_TARGETS": "s3, drive"}


def test_the_policy_from_the_environment() -> None:
    s = SyncSettings.from_env(BOTH)
    assert (s.target, s.allowed_targets, s.drive_auth) == ("s3", ("s3", "drive"), "user")
    assert s.uses_user_token("drive") and not s.uses_user_token("s3") and s.needs_user_tokens
    only_s3 = SyncSettings.from_env(S3)
    assert only_s3.allowed_targets == ("s3",) and not only_s3.needs_user_tokens
    drive = SyncSettings.from_env(DRIVE_USER)
    assert (drive.target, drive.enabled, drive.allowed_targets) == ("drive", True, ("drive",))
    assert SyncSettings.from_env({**BOTH, "DOLAB_SYNC_DRIVE_CLIENT_SECRET": "hush"}).drive_client_secret == "hush"
    assert "hush" not in repr(SyncSettings.from_env({**BOTH, "DOLAB_SYNC_DRIVE_CLIENT_SECRET": "hush"}))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({**S3, "DOLAB_SYNC_TARGETS": "s3,ftp"}, "may list s3 and drive, not 'ftp'"),
        ({**S3, "DOLAB_SYNC_TARGETS": "s3,drive"}, "lists drive, which needs DOLAB_SYNC_DRIVE_KEY_FILE or"),
        ({**DRIVE_USER, "DOLAB_SYNC_TARGETS": "s3,drive"}, "lists s3, which needs DOLAB_SYNC_S3_BUCKET"),
        ({**BOTH, "DOLAB_SYNC_TARGETS": "drive"}, "must include the default target DOLAB_SYNC_TARGET=s3"),
        ({**DRIVE_USER, "DOLAB_SYNC_DRIVE_KEY_FILE": "/k.json"}, "unset DOLAB_SYNC_DRIVE_KEY_FILE"),
        ({"DOLAB_SYNC_DRIVE_AUTH": "oauth"}, "service-account or user, not 'oauth'"),
        ({**S3, "DOLAB_SYNC_TARGET": "drive"}, "or DOLAB_SYNC_DRIVE_AUTH=user"),
    ],
    ids=["unknown", "drive-unset", "s3-unset", "default-outside", "both-drive-auths", "bad-auth", "drive-default"],
)
def test_bad_policies_are_sentences(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyncSettings.from_env(env)


@pytest.mark.parametrize(
    ("env", "reads_tokens"),
    [
        (S3, False),
        ({"DOLAB_SYNC_DRIVE_KEY_FILE": "/k.json"}, False),
        ({**S3, "DOLAB_SYNC_DRIVE_KEY_FILE": "/k.json", "DOLAB_SYNC_TARGETS": "s3,drive"}, False),
        (DRIVE_USER, True),
        (BOTH, True),
        ({**S3, **DRIVE_USER}, False),  # Drive in user mode configured but not allowed: no tokens are read
    ],
    ids=["s3", "drive-service-account", "both-service-account", "drive-user", "both-user", "drive-user-unused"],
)
def test_the_role_reads_auth_state_only_when_drive_uses_users_tokens(env: dict[str, str], reads_tokens: bool) -> None:
    reg = sync_service(env, "/ws", "/data")
    assert reg is not None
    base = ["list:users", "read:users:name", "read:servers", "admin:server_state"]
    assert reg.role["scopes"] == ([*base, "admin:auth_state"] if reads_tokens else base)


def test_choices_persist_and_stay_within_the_policy(tmp_path: Path) -> None:
    settings = SyncSettings.from_env(BOTH)
    path = choices_path(tmp_path)
    choices = TargetChoices(settings, path)
    assert choices.target_of("alice") == "s3"
    assert choices.choose("alice", "drive") == "drive"
    with pytest.raises(ValueError, match="may go to s3 or drive; 'ftp' is not allowed by the administrator's policy"):
        choices.choose("alice", "ftp")
    # Another process (the hub's hooks, a restarted service) reads the same choice.
    assert TargetChoices(settings, path).target_of("alice") == "drive"
    assert TargetChoices(settings, path).target_of("bob") == "s3"
    # The admin narrows the policy: the choice no longer counts, the default does.
    assert TargetChoices(SyncSettings.from_env(S3), path).target_of("alice") == "s3"
    # Choosing the default again forgets the choice.
    choices.choose("alice", "s3")
    assert "alice" not in path.read_text()


def test_each_target_has_its_own_hash_cache(tmp_path: Path) -> None:
    # A cache says which files were uploaded already; one target's must never skip uploads to another.
    backups = Backups(SyncSettings.from_env(BOTH), tmp_path / "ws", tmp_path / "cache")
    try:
        assert backups.cache_path("alice", "s3") != backups.cache_path("alice", "drive")
        assert backups.cache_path("alice", "s3").name == "alice.json.gz"  # as before targets could be chosen
    finally:
        backups.close()
