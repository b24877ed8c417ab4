"""Attacks on the login, on a real hub (the shipped config) and a real OpenID provider (npm oidc-provider).

- Issue 12, item 8: a hub switched to Google or GitHub (or any OpenID provider) with nobody named as allowed let
  every account at the provider in. It must refuse to start, and a stranger must not get in once a list is set.
- Item 13: a member removed from the team at the provider kept the hub and her server until she logged in again.
- Item 14: the generated passwords went to whatever log captured the hub's stderr.

Logins here are made as a browser makes them, with one cookie jar per person: the hub's login link, the provider's
own login form, the redirect back to the hub's callback.
"""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests

from tests.e2e.auth.conftest import ACCESS_TOKEN_TTL, OidcProvider, TestUser, running_provider
from tests.e2e.hub import GPU_INVENTORY, REPO, Hub
from tests.patience import patience

pytestmark = pytest.mark.e2e

CRYPT_KEY = os.urandom(32).hex()
PROFILES = [{"display_name": "CPU only", "slug": "cpu", "default": True}]


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """The real OpenID provider on loopback (tests/oidc/server.mjs), this module's own."""
    with running_provider(tmp_path_factory.mktemp("oidc")) as running:
        yield running


def provider_hub(root: Path, auth: str, client: tuple[str, str] = ("dolab", "secret"), **env: str) -> Hub:
    """A hub logging in with ``auth`` (oidc, google, github); ``env`` adds or replaces DOLAB_* variables."""
    hub = Hub(root, overlay=env.pop("overlay", ""))
    hub.env.update(
        DOLAB_AUTH=auth,
        DOLAB_OIDC_CLIENT_ID=client[0],
        DOLAB_OIDC_CLIENT_SECRET=client[1],
        DOLAB_PROFILES=json.dumps(PROFILES),
        DOLAB_GPU_INVENTORY=json.dumps(GPU_INVENTORY),
        JUPYTERHUB_CRYPT_KEY=CRYPT_KEY,
    )
    hub.env.update(env)
    return hub


def sign_in(hub: Hub, oidc: OidcProvider, name: str, session: requests.Session | None = None) -> requests.Response:
    """Log in as ``name`` the way a browser does; returns the last reply (the hub's page, or its refusal).

    With the provider's session still open in ``session``, the provider asks nothing and sends her straight back.
    """
    session = session or requests.Session()
    page = session.get(f"{hub.url}/hub/oauth_login?next=/hub/home", timeout=60)
    if not page.url.startswith(f"{oidc.url}/interaction/"):
        return page
    action = re.search(r'action="([^"]+)"', page.text)
    assert action, page.text
    return session.post(
        urljoin(page.url, action.group(1)),
        data={"login": name, "password": oidc.users[name].password},
        timeout=60,
    )


# ----- item 8: who may log in -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "names"),
    [
        pytest.param("google", ["DOLAB_ALLOWED_DOMAINS", "DOLAB_ALLOWED_USERS"], id="google"),
        pytest.param("github", ["DOLAB_ALLOWED_ORGS", "DOLAB_ALLOWED_USERS"], id="github"),
        pytest.param("oidc", ["DOLAB_ALLOWED_GROUPS", "DOLAB_ALLOWED_USERS"], id="oidc"),
    ],
)
def test_a_provider_without_an_allow_list_refuses_to_start(tmp_path: Path, auth: str, names: list[str]) -> None:
    # The admin switches to a provider and names no one: every account at the provider would get in.
    hub = provider_hub(tmp_path, auth, DOLAB_OIDC_ISSUER="https://login.example.org/realms/lab")
    try:
        with pytest.raises(RuntimeError, match="the hub exited") as e:
            hub.start(timeout=90)
    finally:
        hub.shutdown()
    said = str(e.value)
    assert f"DOLAB_AUTH={auth} would let anyone with an account at" in said, said
    for name in [*names, "DOLAB_AUTH_ALLOW_ALL=1"]:
        assert name in said, said
    assert "Traceback" not in said


def test_allow_all_is_an_explicit_choice(tmp_path: Path) -> None:
    hub = provider_hub(tmp_path, "github", DOLAB_AUTH_ALLOW_ALL="1")
    try:
        hub.start(timeout=90)
        said = "DO-LAB: anyone with an account at GitHub may log in (DOLAB_AUTH_ALLOW_ALL / allow_all)"
        assert said in hub.log_path.read_text()
    finally:
        hub.shutdown()


@pytest.fixture(scope="module")
def google_hub(provider: OidcProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A hub with DOLAB_AUTH=google limited to one Workspace domain; "Google" is the loopback provider."""
    root = tmp_path_factory.mktemp("google-hub")
    overlay = (
        f"c.DoLabGoogleAuthenticator.authorize_url = {provider.url + '/auth'!r}\n"
        f"c.DoLabGoogleAuthenticator.token_url = {provider.url + '/token'!r}\n"
        f"c.DoLabGoogleAuthenticator.userdata_url = {provider.url + '/me'!r}\n"
    )
    hub = provider_hub(root, "google", overlay=overlay)
    hub.env.update(
        zip(
            ("DOLAB_OIDC_CLIENT_ID", "DOLAB_OIDC_CLIENT_SECRET"),
            provider.register_client(f"{hub.url}/hub/oauth_callback"),
            strict=True,
        ),
        DOLAB_ALLOWED_DOMAINS="lab.example.org",
    )
    provider.set_users(
        {
            "gina": TestUser("gina", secrets.token_urlsafe(12), []),
            "eve": TestUser("eve", secrets.token_urlsafe(12), []),
        },
        gina={"email": "gina@lab.example.org", "hd": "lab.example.org"},
        eve={"email": "eve@gmail.example"},  # a personal account: no Workspace domain
    )
    hub.start(timeout=90)
    yield hub
    hub.shutdown()


def test_a_stranger_cannot_log_in_when_an_allow_list_is_set(google_hub: Hub, provider: OidcProvider) -> None:
    refused = sign_in(google_hub, provider, "eve")
    assert refused.status_code == 403, (refused.url, google_hub.log_tail())
    assert google_hub.api("GET", "/users/eve@gmail.example").status_code == 404  # no user was made
    # A member of the domain gets in through the same provider: the refusal is the allow-list's.
    member = sign_in(google_hub, provider, "gina")
    assert member.status_code == 200 and member.url.startswith(f"{google_hub.url}/hub/"), member.url
    assert google_hub.user("gina")["name"] == "gina"


# ----- item 13: removed from the team at the provider --------------------------------------------------------


@pytest.fixture(scope="module")
def team_hub(provider: OidcProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A hub whose team is the provider's ``lab`` group; tokens are renewed about 10 s after they are issued."""
    root = tmp_path_factory.mktemp("team-hub")
    overlay = (
        "c.DoLabAuthenticator.token_refresh_interval_seconds = 1\n"
        f"c.DoLabAuthenticator.token_refresh_margin_seconds = {ACCESS_TOKEN_TTL - 10}\n"
        # Her server asks the hub who she is at most every 2 s (JupyterHub's default: 5 minutes).
        "c.Spawner.args = ['--HubOAuth.cache_max_age=2']\n"
    )
    hub = provider_hub(root, "oidc", overlay=overlay)
    hub.env.update(
        zip(
            ("DOLAB_OIDC_CLIENT_ID", "DOLAB_OIDC_CLIENT_SECRET"),
            provider.register_client(f"{hub.url}/hub/oauth_callback"),
            strict=True,
        ),
        DOLAB_OIDC_ISSUER=provider.url,
        DOLAB_OIDC_SCOPES="openid profile email groups offline_access",
        DOLAB_ALLOWED_GROUPS="lab",
    )
    hub.start(timeout=90)
    yield hub
    hub.shutdown()


def test_a_member_removed_from_the_team_loses_the_hub_and_her_server(team_hub: Hub, provider: OidcProvider) -> None:
    hub = team_hub
    frank = TestUser("frank", secrets.token_urlsafe(12), ["lab"])
    provider.set_users({"frank": frank})
    browser = requests.Session()
    assert sign_in(hub, provider, "frank", browser).status_code == 200
    reply = hub.start_server("frank", {"profile": "cpu"})
    assert reply.status_code in (201, 202), reply.text
    hub.wait_ready("frank")
    server = f"{hub.url}/user/frank/api/contents"
    # Her browser opens her server: its OAuth with the hub gives her a cookie for it; its API answers.
    assert browser.get(f"{hub.url}/user/frank/lab", timeout=60).status_code == 200
    assert browser.get(server, timeout=60).status_code == 200
    assert browser.get(f"{hub.url}/hub/home", timeout=60).status_code == 200

    provider.set_users({"frank": TestUser("frank", frank.password, [])})  # removed from the team at the provider

    # Her access token is renewed (with the fresh user info) about 10 s after it was issued; well within 2 TTLs.
    deadline = time.monotonic() + 2 * ACCESS_TOKEN_TTL
    while browser.get(f"{hub.url}/hub/home", allow_redirects=False, timeout=60).status_code == 200:
        assert time.monotonic() < deadline, f"frank is still in:\n{hub.log_tail()}"
        time.sleep(1)
    home = browser.get(f"{hub.url}/hub/home", allow_redirects=False, timeout=60)
    assert home.status_code == 302 and "/hub/login" in home.headers["Location"], home.headers
    # Her server no longer takes her cookie: it sends her to the hub, which sends her to log in.
    time.sleep(3)  # her server's cache of the hub's answer (2 s here)
    reply = browser.get(server, allow_redirects=False, timeout=60)
    assert reply.status_code in (302, 403), (reply.status_code, reply.text[:200])
    # ... and logging in again through the provider (her session there is still open) is refused.
    again = sign_in(hub, provider, "frank", browser)
    assert again.status_code == 403, (again.url, again.text[:300])
    assert "/hub/oauth_callback" in again.url
    assert browser.get(server, allow_redirects=False, timeout=60).status_code != 200
    assert "frank is no longer allowed" in hub.log_path.read_text()


# ----- item 14: the generated passwords -------------------------------------------------------------------------


def test_first_start_with_stderr_to_a_file_writes_no_password(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    try:
        hub.start(timeout=90)
    finally:
        hub.shutdown()
    log = hub.log_path.read_text()
    for name in ("shared-password", "admin-password"):
        secret = (hub.data_dir / name).read_text().strip()
        assert secret and secret not in log
        assert oct((hub.data_dir / name).stat().st_mode & 0o777) == "0o600"
        assert str(hub.data_dir / name) in log, log[-2000:]


def test_first_start_on_a_terminal_shows_the_passwords(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(REPO / "jupyterhub_config.py")],
        cwd=tmp_path,
        env=hub.env,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    hub.proc = proc
    seen = bytearray()

    def drain() -> None:  # read the terminal until the hub is gone, so it never blocks writing to it
        while True:
            if select.select([leader], [], [], 1)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the hub closed the terminal
                    return
                if not chunk:
                    return
                seen.extend(chunk)
            elif proc.poll() is not None:
                return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + patience(90)
        while not re.search(rb"admins .*password \S+\r?\n", seen):
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
            time.sleep(0.2)
    finally:
        hub.shutdown()
        reader.join(30)
        os.close(leader)
    text = seen.decode(errors="replace")
    assert (hub.data_dir / "shared-password").read_text().strip() in text
    assert (hub.data_dir / "admin-password").read_text().strip() in text
