"""Attack: an admin's token that its owner limited to one service is stolen (or handed to a script), and used to
act on other users through DO-LAB's services.

The admin made the token to read her own page of the culler (``access:services!service=dolab-culler``), nothing
else; the hub itself would refuse it any other user's server. The services must refuse it too: stop or extend Bob's
server through the culler, read Bob's usage or every GPU in the monitor, back up, list, restore or retarget Bob's
workspace backups in dolab-sync. Only a token that holds DO-LAB's scope for it (``custom:dolab:stop-servers``,
``extend-servers``, ``read-usage``, ``manage-backups``, possibly filtered to Bob) may, and an admin logged in
through a browser keeps every power: the shipped config gives the admin role those scopes and each service's OAuth
client asks for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from ..e2e.hub import Hub
from ..e2e.monitor.test_monitor import login
from ..sync import conftest as sync_conftest
from ..sync.conftest import S3Server
from .servicehub import (
    BACKUPS,
    CULLER,
    EXTEND,
    MONITOR,
    READ_USAGE,
    STOP,
    SYNC,
    access,
    call,
    start_hub,
    token,
    wait_services,
)

pytestmark = pytest.mark.e2e

s3_server = sync_conftest.s3_server  # the session's moto_server (a fixture of tests/sync)

ADMIN, BOB = "admin", "bob"


@dataclass
class Lab:
    hub: Hub
    #: The admin's tokens, each limited to opening one service: what the attacker holds.
    narrow: dict[str, str]
    bob_workspace: Path

    def bob_running(self) -> bool:
        return bool(self.hub.user(BOB).get("servers", {}).get("", {}).get("ready"))

    def bob_stop_time(self) -> str:
        """Bob's stop time as his own culler page shows it (an extension moves it)."""
        page = call(self.hub, CULLER, "GET", "", token(self.hub, BOB, [access(CULLER)]))
        assert page.status_code == 200, page.text
        found = BeautifulSoup(page.text, "html.parser").find("time")
        assert found is not None, page.text
        return str(found["datetime"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[Lab]:
    hub = start_hub(tmp_path_factory.mktemp("scopes"), s3_server)
    try:
        for user in (ADMIN, BOB):
            hub.create_user(user)
        reply = hub.start_server(BOB, {"profile": "cpu", "run_hours": 2})
        assert reply.status_code in (201, 202), reply.text
        hub.wait_ready(BOB, timeout=180)
        wait_services(hub)
        workspace = Path(hub.user(BOB)["servers"][""]["state"]["workspace"])
        (workspace / "thesis.md").write_text("Bob's work")
        narrow = {service: token(hub, ADMIN, [access(service)]) for service in (CULLER, MONITOR, SYNC)}
        yield Lab(hub, narrow, workspace)
    finally:
        hub.shutdown()


def test_a_limited_admin_token_cannot_stop_or_extend_bobs_server(lab: Lab) -> None:
    hub, stolen = lab.hub, lab.narrow[CULLER]
    before = lab.bob_stop_time()
    bob = {"user": BOB, "server": ""}
    for path, body in (("api/stop", bob), ("api/extend", {**bob, "hours": 1}), ("api/keepalive", bob)):
        reply = call(hub, CULLER, "POST", path, stolen, json=body)
        assert reply.status_code == 403, (path, reply.status_code, reply.text)
        assert "custom:dolab:" in reply.json()["message"], "the refusal names the scope it takes"
    # A scope filtered to another user does not reach Bob either.
    carols = token(hub, ADMIN, [access(CULLER), f"{STOP}!user=carol", f"{EXTEND}!user=carol"])
    assert call(hub, CULLER, "POST", "api/stop", carols, json=bob).status_code == 403
    assert call(hub, CULLER, "POST", "api/extend", carols, json={**bob, "hours": 1}).status_code == 403
    assert lab.bob_running(), "Bob's server still runs"
    assert lab.bob_stop_time() == before, "and its stop time did not move"
    # The limited token still does what it was made for: the admin's own page.
    assert call(hub, CULLER, "GET", "api/warnings", stolen).status_code == 200


def test_a_limited_admin_token_cannot_read_other_users_usage(lab: Lab) -> None:
    hub, stolen = lab.hub, lab.narrow[MONITOR]
    for path in (f"api/usage?user={BOB}", "api/overview", f"api/quota/{BOB}", f"?user={BOB}"):
        reply = call(hub, MONITOR, "GET", path, stolen)
        assert reply.status_code == 403, (path, reply.status_code, reply.text)
        assert BOB not in reply.text.replace(f"user={BOB}", ""), "nothing of Bob's in the refusal"
    own = call(hub, MONITOR, "GET", "api/usage", stolen)
    assert own.status_code == 200 and own.json()["user"] == ADMIN
    page = BeautifulSoup(call(hub, MONITOR, "GET", "", stolen).text, "html.parser")
    assert page.find("section", id="admin") is None, "every GPU and server only with the scope"


def test_a_limited_admin_token_cannot_touch_other_users_backups(lab: Lab) -> None:
    hub, stolen = lab.hub, lab.narrow[SYNC]
    attempts = [
        ("GET", f"api/backups?user={BOB}", None),
        ("POST", "api/backup", {"user": BOB, "server": ""}),
        ("POST", "api/restore", {"user": BOB, "into": "from-the-attacker"}),
        ("GET", f"api/target?user={BOB}", None),
        ("PUT", "api/target", {"user": BOB, "target": "s3"}),
    ]
    for method, path, body in attempts:
        reply = call(hub, SYNC, method, path, stolen, json=body)
        assert reply.status_code == 403, (path, reply.status_code, reply.text)
    # Nothing was backed up for Bob (the periodic backups are off): his list is still empty.
    keeper = token(hub, ADMIN, [access(SYNC), f"{BACKUPS}!user={BOB}"])
    listed = call(hub, SYNC, "GET", f"api/backups?user={BOB}", keeper)
    assert listed.status_code == 200 and listed.json()["snapshots"] == [], listed.text


def test_tokens_with_dolab_scopes_act_for_the_users_they_name(lab: Lab) -> None:
    hub = lab.hub
    # Backups: a token for Bob's backups backs up, lists and restores them.
    keeper = token(hub, ADMIN, [access(SYNC), f"{BACKUPS}!user={BOB}"])
    made = call(hub, SYNC, "POST", "api/backup", keeper, json={"user": BOB, "server": ""})
    assert made.status_code == 200 and made.json()["snapshot"], made.text
    listed = call(hub, SYNC, "GET", f"api/backups?user={BOB}", keeper).json()["snapshots"]
    assert [s["id"] for s in listed] == [made.json()["snapshot"]]
    restored = call(hub, SYNC, "POST", "api/restore", keeper, json={"user": BOB, "into": "restored"})
    assert restored.status_code == 200 and restored.json()["files"] >= 1, restored.text
    assert (lab.bob_workspace / "restored" / "thesis.md").read_text() == "Bob's work"
    assert call(hub, SYNC, "GET", "api/backups?user=carol", keeper).status_code == 403, "Bob's only"

    # Usage: with read-usage, Bob's usage and every GPU and server.
    reader = token(hub, ADMIN, [access(MONITOR), READ_USAGE])
    usage = call(hub, MONITOR, "GET", f"api/usage?user={BOB}", reader)
    assert usage.status_code == 200 and usage.json()["user"] == BOB
    assert call(hub, MONITOR, "GET", "api/overview", reader).status_code == 200
    assert call(hub, MONITOR, "GET", f"api/quota/{BOB}", reader).status_code == 200

    # Stop times and stops: a token for Bob's server extends it, then stops it.
    before = lab.bob_stop_time()
    operator = token(hub, ADMIN, [access(CULLER), f"{EXTEND}!user={BOB}", f"{STOP}!server={BOB}/"])
    extended = call(hub, CULLER, "POST", "api/extend", operator, json={"user": BOB, "server": "", "hours": 1})
    assert extended.status_code == 200, extended.text
    assert lab.bob_stop_time() > before
    stopped = call(hub, CULLER, "POST", "api/stop", operator, json={"user": BOB, "server": ""})
    assert stopped.status_code == 200 and stopped.json()["result"] == "stopped", stopped.text
    assert not lab.bob_running()


def test_an_admin_in_a_browser_keeps_every_power(lab: Lab) -> None:
    # The OAuth token the hub issues to the monitor for the admin's browser carries read-usage (the admin role
    # has it, the monitor's client asks for it): the admin's page shows every GPU and server.
    hub = lab.hub
    browser = login(hub, ADMIN, "admin-password")
    page = browser.get(f"{hub.url}/services/{MONITOR}/", timeout=60)  # through the proxy, as a browser goes
    assert page.status_code == 200, page.text[:500]
    assert BeautifulSoup(page.text, "html.parser").find("section", id="admin") is not None, page.text[:2000]
    # A user's full token (not limited) is the user's permissions: an admin's reaches the overview too.
    assert call(hub, MONITOR, "GET", "api/overview", token(hub, ADMIN)).status_code == 200
