"""Logging in with a real OpenID Connect provider, end to end.

A real hub runs the shipped config with ``DOLAB_AUTH=oidc`` (environment variables only) against npm's
oidc-provider on loopback; Chromium (Playwright) goes hub -> provider login page -> callback -> spawn form. Then:
groups are synced, a CPU-plan user sees and can start only CPU profiles (REST refused with 403), access tokens are
renewed before they expire, auth_state is encrypted in the database, no user can read another's tokens, tokens
never reach a user's server, and a provider that is down or answers garbage gives a login error page, not a 500.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.fernet import Fernet
from playwright.sync_api import expect

from tests.e2e.hub import GPU_INVENTORY, Hub
from tests.patience import patience_ms

from .conftest import ACCESS_TOKEN_TTL, OidcProvider

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
CRYPT_KEY = os.urandom(32).hex()
PROFILES = [
    {"display_name": "CPU only", "slug": "cpu", "default": True},
    {"display_name": "One A100", "slug": "a100", "gpus": 1, "gpu_type": "A100"},
]
PLANS = {
    "plans": {
        "cpu": {"profiles": ["cpu"], "quotas": {"gpu_hours": {"week": 0}}, "max_run_hours": 24},
        "gpu": {"profiles": ["cpu", "a100"], "quotas": {"gpu_hours": {"week": 40}}, "max_run_hours": 72},
    },
    "groups": {"students": "cpu", "researchers": "gpu", "lab-admins": "gpu"},
}
#: The hub renews an access token this long before it expires, looking every second: with the provider's TTL of
#: 90 s, a token is renewed about 10 s after it was issued.
REFRESH_MARGIN = ACCESS_TOKEN_TTL - 10
#: Two stand-ins for the Drive sync service, with the scopes the README gives it: every user, or one user only.
SYNC_TOKEN = secrets.token_hex(16)
SYNC_ANA_TOKEN = secrets.token_hex(16)
OVERLAY = f"""
c.DoLabAuthenticator.token_refresh_interval_seconds = 1
c.DoLabAuthenticator.token_refresh_margin_seconds = {REFRESH_MARGIN}
c.JupyterHub.load_roles.append({{"name": "dolab-test-groups", "scopes": ["read:groups"], "services": ["dolab-test"]}})
c.JupyterHub.services.extend([
    {{"name": "sync-probe", "api_token": {SYNC_TOKEN!r}, "display": False}},
    {{"name": "sync-probe-ana", "api_token": {SYNC_ANA_TOKEN!r}, "display": False}},
])
c.JupyterHub.load_roles.extend([
    {{"name": "sync-probe", "scopes": ["read:users:name", "admin:auth_state"], "services": ["sync-probe"]}},
    {{
        "name": "sync-probe-ana",
        "scopes": ["read:users:name!user=ana", "admin:auth_state!user=ana"],
        "services": ["sync-probe-ana"],
    }},
])
"""


@pytest.fixture(scope="module")
def hub(oidc: OidcProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("oidc-hub")
    plans_file = root / "plans.json"
    plans_file.write_text(json.dumps(PLANS))
    hub = Hub(root, overlay=OVERLAY)
    client_id, client_secret = oidc.register_client(f"{hub.url}/hub/oauth_callback")
    hub.env.update(
        DOLAB_AUTH="oidc",
        DOLAB_OIDC_ISSUER=oidc.url,
        DOLAB_OIDC_CLIENT_ID=client_id,
        DOLAB_OIDC_CLIENT_SECRET=client_secret,
        DOLAB_OIDC_SCOPES="openid profile email groups offline_access",
        DOLAB_ADMIN_GROUP="lab-admins",
        DOLAB_ALLOWED_GROUPS="researchers,students,lab-admins",  # without who may log in, the hub refuses to start
        DOLAB_PLANS_FILE=str(plans_file),
        DOLAB_PROFILES=json.dumps(PROFILES),
        DOLAB_GPU_INVENTORY=json.dumps(GPU_INVENTORY),
        JUPYTERHUB_CRYPT_KEY=CRYPT_KEY,
    )
    hub.start()
    yield hub
    hub.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is missing: `make test` installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, tmp_path: Path):
    """A fresh browser context (no cookies of the hub or the provider) per test; a screenshot on failure."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(patience_ms(60))
    try:
        yield page
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"))
        raise
    finally:
        context.close()


def sign_in(page, hub: Hub, oidc: OidcProvider, name: str) -> None:
    """Hub login page -> "Sign in with" -> the provider's own login page -> submit (the callback follows)."""
    page.goto(f"{hub.url}/hub/login")
    page.click('a[href*="oauth_login"]')
    page.wait_for_selector("input[name=login]")
    assert page.url.startswith(f"{oidc.url}/interaction/"), page.url  # the provider's page, not the hub's
    page.fill("input[name=login]", name)
    page.fill("input[name=password]", oidc.users[name].password)
    page.click("#signin")


def profile_cards(page) -> list[str]:
    page.wait_for_selector("#dolab-options")
    return page.locator(".dolab-profile").evaluate_all("cards => cards.map(c => c.dataset.profile)")


def auth_state(hub: Hub, name: str) -> dict[str, Any]:
    """The user's auth_state, read the way the sync service reads it (admin:auth_state)."""
    reply = hub.api("GET", f"/users/{name}")
    reply.raise_for_status()
    state = reply.json()["auth_state"]
    assert state, f"{name} has no auth_state:\n{hub.log_tail()}"
    return state


# ----- the login --------------------------------------------------------------------------------------------


def test_browser_login_through_the_provider_reaches_the_spawn_form(hub: Hub, oidc: OidcProvider, page) -> None:
    sign_in(page, hub, oidc, "ana")
    assert profile_cards(page) == ["cpu", "a100"]  # a researcher: the GPU plan
    assert page.url.startswith(f"{hub.url}/hub/spawn"), page.url
    state = auth_state(hub, "ana")
    # The browser holds the hub's cookies, never the provider's tokens.
    seen = page.content() + json.dumps(page.context.cookies())
    for token in (state["access_token"], state["refresh_token"], state["id_token"]):
        assert token and token not in seen


def test_groups_are_synced_and_admins_come_from_the_admin_group(hub: Hub, oidc: OidcProvider, page) -> None:
    sign_in(page, hub, oidc, "carol")
    page.wait_for_selector("#dolab-options")
    ana, carol = hub.user("ana"), hub.user("carol")
    assert (ana["groups"], ana["admin"]) == (["researchers"], False)
    assert (sorted(carol["groups"]), carol["admin"]) == (["lab-admins", "students"], True)
    group = hub.api("GET", "/groups/researchers").json()
    assert group["users"] == ["ana"]


def test_a_cpu_plan_user_sees_and_starts_only_cpu_profiles(hub: Hub, oidc: OidcProvider, page) -> None:
    sign_in(page, hub, oidc, "bob")
    assert profile_cards(page) == ["cpu"]
    assert hub.user("bob")["groups"] == ["students"]
    # The same user through REST, with their own token, asking for the GPU profile the form did not show.
    token = hub.user_token("bob")
    reply = requests.post(
        f"{hub.url}/hub/api/users/bob/server",
        headers={"Authorization": f"token {token}"},
        json={"user_options": {"profile": "a100"}},
        timeout=60,
    )
    assert reply.status_code == 403, reply.text
    assert reply.json()["message"] == (
        "Your plan does not include the profile 'One A100' (a100). You can start: cpu. "
        "Ask an administrator if you need it."
    )
    assert "" not in hub.user("bob").get("servers", {})  # nothing started, nothing held


# ----- tokens -----------------------------------------------------------------------------------------------


def test_auth_state_is_encrypted_at_rest(hub: Hub) -> None:
    state = auth_state(hub, "ana")
    with sqlite3.connect(hub.data_dir / "jupyterhub.sqlite") as db:
        (blob,) = db.execute("SELECT encrypted_auth_state FROM users WHERE name = 'ana'").fetchone()
    assert blob
    for secret in (state["access_token"], state["refresh_token"], "access_token", "refresh_token", "researchers"):
        assert secret.encode() not in blob
    # ... and it is the auth_state, encrypted with the hub's key (JupyterHub's Fernet scheme).
    decrypted = json.loads(Fernet(base64.urlsafe_b64encode(bytes.fromhex(CRYPT_KEY))).decrypt(blob))
    assert decrypted["oauth_user"]["preferred_username"] == "ana"


def test_access_tokens_are_renewed_before_they_expire(hub: Hub, oidc: OidcProvider) -> None:
    first = auth_state(hub, "ana")
    refreshes = oidc.stats()["grants"].get("refresh_token", 0)
    deadline = time.monotonic() + 2 * ACCESS_TOKEN_TTL
    state = first
    while state["access_token"] == first["access_token"]:
        assert time.monotonic() < deadline, f"no renewal:\n{hub.log_tail()}"
        time.sleep(0.5)
        state = auth_state(hub, "ana")
    # Renewed before the old one expired, with the refresh token, and the new one works at the provider.
    assert state["expires_at"] > first["expires_at"]
    assert oidc.stats()["grants"]["refresh_token"] > refreshes
    assert state["refresh_token"]
    assert oidc.userinfo(state["access_token"]).json()["sub"] == "ana"
    assert "Renewed ana's access token" in hub.log_path.read_text()


def test_no_user_can_read_another_users_tokens(hub: Hub) -> None:
    ana = auth_state(hub, "ana")
    bob = auth_state(hub, "bob")
    headers = {"Authorization": f"token {hub.user_token('bob')}"}
    api = f"{hub.url}/hub/api"
    replies = [
        requests.get(f"{api}/users/ana", headers=headers, timeout=30),
        requests.get(f"{api}/users/bob", headers=headers, timeout=30),
        requests.get(f"{api}/user", headers=headers, timeout=30),
        requests.get(f"{api}/users", headers=headers, timeout=30),
        requests.get(f"{api}/groups/researchers", headers=headers, timeout=30),
    ]
    assert replies[0].status_code == 404  # another user does not exist for bob
    assert replies[1].status_code == 200 and replies[2].status_code == 200
    assert "auth_state" not in replies[1].json() and "auth_state" not in replies[2].json()
    for reply in replies:
        for token in (ana["access_token"], ana["refresh_token"], bob["access_token"], bob["refresh_token"]):
            assert token not in reply.text


def test_the_sync_service_reads_tokens_with_admin_auth_state_only(hub: Hub) -> None:
    def read(token: str, name: str) -> requests.Response:
        return requests.get(f"{hub.url}/hub/api/users/{name}", headers={"Authorization": f"token {token}"}, timeout=30)

    ana = auth_state(hub, "ana")
    for reply in (read(SYNC_TOKEN, "ana"), read(SYNC_ANA_TOKEN, "ana")):
        assert reply.status_code == 200, reply.text
        state = reply.json()["auth_state"]
        assert state["access_token"] and state["expires_at"] > time.time()
        assert state["oauth_user"]["preferred_username"] == "ana"
        assert set(reply.json()) == {"kind", "name", "admin", "user_info", "auth_state"}  # no servers, groups
    assert read(SYNC_TOKEN, "bob").json()["auth_state"]["oauth_user"]["preferred_username"] == "bob"
    # Filtered to one user, the other users do not exist for it.
    refused = read(SYNC_ANA_TOKEN, "bob")
    assert refused.status_code == 404 and ana["refresh_token"] not in refused.text
    assert (
        requests.get(
            f"{hub.url}/hub/api/users", headers={"Authorization": f"token {SYNC_TOKEN}"}, timeout=30
        ).status_code
        == 403
    )  # it cannot list users, only read those it is told about


def test_tokens_never_reach_the_users_server(hub: Hub) -> None:
    reply = hub.start_server("ana", {"profile": "cpu"})
    assert reply.status_code in (201, 202), reply.text
    server = hub.wait_ready("ana")
    state = auth_state(hub, "ana")
    pid = server["state"]["backend_state"]["pid"]
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"JUPYTERHUB_API_TOKEN" in environ  # it is the server's environment
    for token in (state["access_token"], state["refresh_token"], state["id_token"]):
        assert token.encode() not in environ
    hub.stop_server("ana")


# ----- a provider that fails --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "status", "words"),
    [
        ("down", 503, "could not be reached while signing you in"),
        ("garbage", 502, "answered something DO-LAB could not read while signing you in"),
    ],
)
def test_a_failing_provider_gives_a_login_error_page(
    hub: Hub, oidc: OidcProvider, page, mode: str, status: int, words: str
) -> None:
    oidc.set_mode(mode)  # its login page still works; the hub's requests to it fail
    try:
        with page.expect_response(lambda r: "/hub/oauth_callback" in r.url) as callback:
            sign_in(page, hub, oidc, "dave")
        assert callback.value.status == status
        # the response can arrive before the page is drawn: wait for the sentence, then read the rest
        body = page.locator("body")
        expect(body).to_contain_text(f"The identity provider at {oidc.url} {words}", timeout=patience_ms(60))
        assert "Please try again in a few minutes" in body.inner_text()
    finally:
        oidc.set_mode("ok")
    assert hub.api("GET", "/users/dave").status_code == 404  # no half-made user


def test_the_hub_refuses_to_start_without_a_crypt_key(oidc: OidcProvider, tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    hub.env.update(
        DOLAB_AUTH="oidc",
        DOLAB_OIDC_ISSUER=oidc.url,
        DOLAB_OIDC_CLIENT_ID="dolab",
        DOLAB_OIDC_CLIENT_SECRET="secret",
    )
    with pytest.raises(RuntimeError, match="the hub exited") as e:
        hub.start(timeout=60)
    assert (
        "DO-LAB: bad configuration: a login provider keeps each user's tokens in encrypted auth_state, so "
        "JUPYTERHUB_CRYPT_KEY must be set" in str(e.value)
    )
