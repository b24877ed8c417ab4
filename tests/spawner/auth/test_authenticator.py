"""DoLabAuthenticator's parts without a hub: OpenID discovery against the real provider, failures as sentences,
the environment switch of the shipped config, admin claims, and the Google and GitHub variants."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from traitlets.config import Config

from dolab_core.hubconfig import ConfigEnvError
from dolab_spawner.auth import (
    DRIVE_SCOPE,
    DoLabAuthenticator,
    DoLabGitHubAuthenticator,
    DoLabGoogleAuthenticator,
    ProviderError,
)
from dolab_spawner.auth.envconfig import PROVIDERS as PROVIDER_CLASSES
from dolab_spawner.auth.envconfig import configure_login
from dolab_spawner.auth.providers import github_team_groups
from tests.e2e.auth.conftest import OidcProvider
from tests.e2e.hub import free_port

CRYPT_KEY = "ab" * 32


@pytest.fixture
def provider_mode(oidc: OidcProvider) -> Iterator[Any]:
    try:
        yield oidc.set_mode
    finally:
        oidc.set_mode("ok")


async def test_discovery_reads_the_issuers_endpoints(oidc: OidcProvider) -> None:
    auth = DoLabAuthenticator(issuer=oidc.url + "/")
    await auth.ensure_discovered()
    assert (auth.authorize_url, auth.token_url, auth.userdata_url) == (
        f"{oidc.url}/auth",
        f"{oidc.url}/token",
        f"{oidc.url}/me",
    )


async def test_explicit_urls_need_no_discovery() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    auth = DoLabAuthenticator(issuer=dead, authorize_url=f"{dead}/a", token_url=f"{dead}/t", userdata_url=f"{dead}/u")
    await auth.ensure_discovered()  # nothing listens there: a request would fail
    assert auth.token_url == f"{dead}/t"


async def test_discovery_of_a_provider_that_is_not_there() -> None:
    issuer = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ProviderError) as e:
        await DoLabAuthenticator(issuer=issuer).ensure_discovered()
    assert e.value.status_code == 503
    assert e.value.sentence == (
        f"The identity provider at {issuer} could not be reached while reading its OpenID configuration. "
        "Please try again in a few minutes; if it keeps happening, tell an administrator."
    )


@pytest.mark.parametrize(
    ("mode", "status", "words"),
    [("down", 503, "could not be reached"), ("garbage", 502, "answered something DO-LAB could not read")],
)
async def test_discovery_failures_are_sentences(oidc: OidcProvider, provider_mode, mode, status, words) -> None:
    provider_mode(mode)
    auth = DoLabAuthenticator(issuer=oidc.url)
    with pytest.raises(ProviderError) as e:
        await auth.ensure_discovered()
    assert e.value.status_code == status
    assert words in e.value.sentence and oidc.url in e.value.sentence
    assert not auth.token_url  # nothing half-discovered
    provider_mode("ok")
    await auth.ensure_discovered()  # and it recovers once the provider answers
    assert auth.token_url == f"{oidc.url}/token"


async def test_an_issuer_mismatch_is_refused(oidc: OidcProvider) -> None:
    auth = DoLabAuthenticator(issuer=oidc.url)
    auth.issuer = oidc.url.replace("127.0.0.1", "localhost")  # same server, another issuer name
    with pytest.raises(ProviderError) as e:
        await auth.ensure_discovered()
    assert e.value.status_code == 502


# ----- admins, groups, providers ---------------------------------------------------------------------------


def model(user_info: dict[str, Any], admin: bool | None = None) -> dict[str, Any]:
    return {"name": "ana", "admin": admin, "auth_state": {"oauth_user": user_info}}


@pytest.mark.parametrize(
    ("claim", "user_info", "admin", "expected"),
    [
        pytest.param("", {"dolab_admin": True}, None, None, id="no-claim-configured"),
        pytest.param("dolab_admin", {"dolab_admin": True}, None, True, id="claim-true"),
        pytest.param("dolab_admin", {"dolab_admin": "yes"}, None, False, id="only-true-counts"),
        pytest.param("dolab_admin", {}, None, False, id="claim-missing"),
        pytest.param("dolab_admin", {"dolab_admin": False}, True, True, id="admin-users-win"),
    ],
)
async def test_admin_claim(claim: str, user_info: dict[str, Any], admin: bool | None, expected: bool | None) -> None:
    auth = DoLabAuthenticator(admin_claim=claim)
    assert (await auth.update_auth_model(model(user_info, admin)))["admin"] is expected


async def test_groups_and_admin_group_come_from_the_claim() -> None:
    auth = DoLabAuthenticator(admin_groups={"lab-admins"}, groups_claim="roles")
    result = await auth._apply_managed_groups(model({"roles": ["students", "lab-admins"]}))
    assert result["groups"] == ["lab-admins", "students"] and result["admin"] is True
    result = await auth._apply_managed_groups(model({"roles": ["students"]}))
    assert result["groups"] == ["students"] and result["admin"] is False


def test_google_drive_backup_asks_for_drive_file_offline() -> None:
    plain = DoLabGoogleAuthenticator()
    assert DRIVE_SCOPE not in plain.scope and "access_type" not in plain.extra_authorize_params
    drive = DoLabGoogleAuthenticator(drive_backup=True)
    assert DRIVE_SCOPE in drive.scope and "openid" in drive.scope
    assert drive.extra_authorize_params == {"access_type": "offline", "prompt": "consent"}
    assert drive.enable_auth_state and drive.auth_state_groups_key == "google_user.google_groups"


def test_github_teams_become_groups() -> None:
    state = {"teams": [{"slug": "ml", "organization": {"login": "lab"}}, {"slug": "x"}]}
    assert github_team_groups(state) == ["lab:ml"]
    assert DoLabGitHubAuthenticator().auth_state_groups_key is github_team_groups


# ----- the environment switch ------------------------------------------------------------------------------

BASE_ENV = {
    "DOLAB_AUTH": "oidc",
    "DOLAB_OIDC_ISSUER": "https://login.example.org/realms/lab",
    "DOLAB_OIDC_CLIENT_ID": "dolab",
    "DOLAB_OIDC_CLIENT_SECRET": "s3cret",
    "JUPYTERHUB_CRYPT_KEY": CRYPT_KEY,
}


def test_default_stays_the_shared_password() -> None:
    c = Config()
    assert configure_login(c, {}, "http://127.0.0.1:8000") is None
    assert "authenticator_class" not in c.JupyterHub


def test_oidc_from_the_environment() -> None:
    c = Config()
    env = {
        **BASE_ENV,
        "DOLAB_OIDC_SCOPES": "openid profile, email groups",
        "DOLAB_ADMIN_GROUP": "lab-admins, ops",
        "DOLAB_ALLOWED_GROUPS": "students,researchers",
        "DOLAB_OIDC_GROUPS_CLAIM": "roles",
    }
    assert configure_login(c, env, "https://lab.example.org/") == "oidc"
    assert c.JupyterHub.authenticator_class is DoLabAuthenticator
    auth = DoLabAuthenticator(config=c)
    assert auth.issuer == "https://login.example.org/realms/lab"
    assert (auth.client_id, auth.client_secret) == ("dolab", "s3cret")
    assert auth.oauth_callback_url == "https://lab.example.org/hub/oauth_callback"
    assert auth.scope == ["openid", "profile", "email", "groups"]
    assert auth.admin_groups == {"lab-admins", "ops"}
    assert auth.allowed_groups == {"students", "researchers"} and not auth.allow_all
    assert auth.auth_state_groups_key == "oauth_user.roles"
    assert auth.admin_users == set()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"JUPYTERHUB_CRYPT_KEY": ""}, "JUPYTERHUB_CRYPT_KEY must be set", id="no-crypt-key"),
        pytest.param({"JUPYTERHUB_CRYPT_KEY": "short"}, "must be 32 bytes", id="bad-crypt-key"),
        pytest.param({"DOLAB_OIDC_ISSUER": ""}, "needs DOLAB_OIDC_ISSUER", id="no-issuer"),
        pytest.param({"DOLAB_OIDC_CLIENT_SECRET": ""}, "needs DOLAB_OIDC_CLIENT_SECRET", id="no-secret"),
        pytest.param({"DOLAB_AUTH": "ldap"}, "DOLAB_AUTH='ldap' is not known", id="unknown"),
        pytest.param({"DOLAB_DRIVE_BACKUP": "1"}, "needs DOLAB_AUTH=google", id="drive-without-google"),
    ],
)
def test_environment_errors_are_sentences(change: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigEnvError, match=message):
        configure_login(Config(), {**BASE_ENV, **change}, "http://127.0.0.1:8000")


def test_google_with_drive_backup_from_the_environment() -> None:
    c = Config()
    env = {**BASE_ENV, "DOLAB_AUTH": "google", "DOLAB_OIDC_ISSUER": "", "DOLAB_DRIVE_BACKUP": "1"}
    assert configure_login(c, env, "http://127.0.0.1:8000") == "google"
    auth = DoLabGoogleAuthenticator(config=c)
    assert auth.drive_backup and DRIVE_SCOPE in auth.scope


# ----- who may log in ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "cls", "rules"),
    [
        pytest.param({"DOLAB_ALLOWED_GROUPS": "lab"}, DoLabAuthenticator, ["allowed_groups"], id="oidc-groups"),
        pytest.param({"DOLAB_ALLOWED_USERS": "ana, bob"}, DoLabAuthenticator, ["allowed_users"], id="oidc-users"),
        pytest.param(
            {"DOLAB_AUTH": "google", "DOLAB_ALLOWED_DOMAINS": "Lab.example.org"},
            DoLabGoogleAuthenticator,
            ["hosted_domain"],
            id="google-domains",
        ),
        pytest.param(
            {"DOLAB_AUTH": "github", "DOLAB_ALLOWED_ORGS": "lab,lab:ml"},
            DoLabGitHubAuthenticator,
            ["allowed_organizations"],
            id="github-orgs",
        ),
    ],
)
def test_allow_lists_from_the_environment(env: dict[str, str], cls: type, rules: list[str]) -> None:
    c = Config()
    configure_login(c, {**BASE_ENV, **env}, "http://127.0.0.1:8000")
    auth = cls(config=c)
    assert auth.allow_rules() == rules and auth.allow_all is False
    auth.check_allow_config()  # starts
    if cls is DoLabGoogleAuthenticator:
        assert auth.hosted_domain == ["lab.example.org"]


@pytest.mark.parametrize("mode", ["oidc", "google", "github"])
def test_no_allow_list_stops_the_hub_with_a_sentence(mode: str) -> None:
    c = Config()
    c.Authenticator.allow_all = True  # the shipped config's shared-password default must not leak through
    configure_login(c, {**BASE_ENV, "DOLAB_AUTH": mode}, "http://127.0.0.1:8000")
    auth = PROVIDER_CLASSES[mode](config=c)
    assert auth.allow_all is False
    with pytest.raises(SystemExit) as e:
        auth.check_allow_config()
    assert str(e.value).startswith(f"DO-LAB: bad configuration: DOLAB_AUTH={mode} would let anyone with an account")
    assert "DOLAB_AUTH_ALLOW_ALL=1" in str(e.value)


def test_allow_all_is_explicit() -> None:
    c = Config()
    configure_login(c, {**BASE_ENV, "DOLAB_AUTH": "github", "DOLAB_AUTH_ALLOW_ALL": "1"}, "http://127.0.0.1:8000")
    auth = DoLabGitHubAuthenticator(config=c)
    assert auth.allow_all is True and auth.allow_rules() == []
    auth.check_allow_config()  # a warning in the log, no exit


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"DOLAB_ALLOWED_DOMAINS": "lab.example.org"}, "needs DOLAB_AUTH=google", id="domains-oidc"),
        pytest.param({"DOLAB_ALLOWED_ORGS": "lab"}, "needs DOLAB_AUTH=github", id="orgs-oidc"),
    ],
)
def test_allow_lists_for_another_provider_are_sentences(change: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigEnvError, match=message):
        configure_login(Config(), {**BASE_ENV, **change}, "http://127.0.0.1:8000")


def google_model(hd: str | None) -> dict[str, Any]:
    info = {"email": "gina@lab.example.org", "domain": "lab.example.org", "verified_email": True, "google_groups": []}
    if hd:
        info["hd"] = hd
    return {"name": "gina", "admin": None, "auth_state": {"google_user": info}}


@pytest.mark.parametrize(("hd", "allowed"), [("lab.example.org", True), ("other.example", False), (None, False)])
async def test_a_google_domain_admits_its_members(hd: str | None, allowed: bool) -> None:
    auth = DoLabGoogleAuthenticator(hosted_domain=["lab.example.org"])
    assert await auth.still_allowed("gina", google_model(hd)) is allowed


async def test_refreshed_claims_are_checked_again() -> None:
    auth = DoLabAuthenticator(allowed_groups={"lab"}, admin_groups={"lab-admins"})
    member = await auth._apply_managed_groups(model({"groups": ["lab"]}))
    admin = await auth._apply_managed_groups(model({"groups": ["lab-admins"]}))
    gone = await auth._apply_managed_groups(model({"groups": ["alumni"]}))
    assert await auth.still_allowed("ana", member) and await auth.still_allowed("ana", admin)
    assert not await auth.still_allowed("ana", gone)
