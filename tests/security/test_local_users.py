"""Attack: a user of the embedded default (local backend, hub run as root) reaches the hub's secrets and other users.

Mallory logs in like anyone else, starts her server, and through it (a kernel, a terminal, with her own token)
tries to read what only the hub may read: the admin password, the hub database and cookie secret, Bob's
workspace, the hub's and Bob's server's environment. Each read must be refused, her processes must run as an
account of her own (never uid 0), and odd hub user names must map to safe, distinct account names.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import websocket

from tests.e2e.hub import Hub, free_port
from tests.e2e.jupyter import run_in_kernel
from tests.sync.conftest import S3Server, s3_server  # noqa: F401 - s3_server is a fixture

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="the hub must run as root to give users accounts of their own"),
]

CPU_ONLY = [{"display_name": "CPU only", "slug": "cpu", "default": True}]
OVERLAY = f"c.DoLabSpawner.profile_list = {CPU_ONLY!r}\n"

# Run in Mallory's kernel: try each (kind, path) and say what happened, without ever printing what was read
# ("signal" sends signal 0 to a pid: allowed only to its owner and root).
PROBE = """
import json, os
out = {}
for kind, path in json.loads(%r):
    try:
        if kind == "list":
            os.listdir(path)
        elif kind == "signal":
            os.kill(int(path), 0)
        else:
            with open(path, "rb") as f:
                f.read(64)
        out[path] = "read"
    except PermissionError:
        out[path] = "refused"
    except FileNotFoundError:
        out[path] = "missing"
    except OSError as e:
        out[path] = "error %%s" %% e.errno
print(json.dumps(out))
"""

WHOAMI = """
import json, os, pwd
print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "name": pwd.getpwuid(os.getuid()).pw_name, "home": os.environ.get("HOME"), "user": os.environ.get("USER"),
    "shell": os.environ.get("SHELL"), "cwd": os.getcwd()}))
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    hub = Hub(tmp_path_factory.mktemp("local-users"), overlay=OVERLAY).start()
    yield hub
    hub.shutdown()


def start(hub: Hub, user: str, name: str = "") -> dict:
    """Create ``user`` and start their (named) server unless it runs; returns its model once ready."""
    hub.create_user(user)
    if hub.user(user)["servers"].get(name, {}).get("ready"):
        return hub.wait_ready(user, name)
    reply = hub.start_server(user, {}, name=name)
    assert reply.status_code in (201, 202), reply.text
    return hub.wait_ready(user, name)


def whoami(hub: Hub, user: str, token: str, server: str = "") -> dict:
    """Who the kernel of ``user``'s server runs as."""
    return json.loads(run_in_kernel(hub.url, user, token, WHOAMI, server=server))


def probe(hub: Hub, user: str, token: str, targets: list[tuple[str, Path | str]]) -> dict[str, str]:
    """Path -> read/refused/missing, as seen from a kernel of ``user``'s server."""
    code = PROBE % json.dumps([(kind, str(path)) for kind, path in targets])
    return json.loads(run_in_kernel(hub.url, user, token, code))


def in_terminal(hub: Hub, user: str, token: str, command: str, timeout: float = 60) -> str:
    """Open a terminal on ``user``'s server, type ``command``, return what it printed up to an end mark."""
    base = f"{hub.url}/user/{quote(user, safe='@~')}/"
    headers = {"Authorization": f"token {token}"}
    reply = requests.post(f"{base}api/terminals", headers=headers, timeout=timeout)
    reply.raise_for_status()
    name = reply.json()["name"]
    try:
        url = base.replace("http://", "ws://", 1) + f"terminals/websocket/{name}"
        ws = websocket.create_connection(url, header=[f"Authorization: token {token}"], timeout=timeout)
        try:
            # The echo of the typed line shows "END-$((40+2))"; only the shell's output shows "END-42".
            ws.send(json.dumps(["stdin", f"{command}; echo END-$((40+2))\r"]))
            out = ""
            deadline = time.monotonic() + timeout
            while "END-42" not in out and time.monotonic() < deadline:
                msg = json.loads(ws.recv())
                if msg[0] == "stdout":
                    out += msg[1]
            assert "END-42" in out, out
            # Without the terminal's control sequences and carriage returns.
            return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out).replace("\r", "")
        finally:
            ws.close()
    finally:
        requests.delete(f"{base}api/terminals/{name}", headers=headers, timeout=timeout)


def server_pid(hub: Hub, user: str, name: str = "") -> int:
    return hub.user(user)["servers"][name]["state"]["backend_state"]["pid"]


def test_mallory_cannot_read_the_hub_or_bob(hub: Hub) -> None:
    start(hub, "bob")
    bob_token = hub.user_token("bob")
    bob = whoami(hub, "bob", bob_token)
    run_in_kernel(hub.url, "bob", bob_token, "open('secret.txt', 'w').write('bob only')")
    start(hub, "mallory")
    token = hub.user_token("mallory")

    data = hub.data_dir
    targets: list[tuple[str, Path | str]] = [
        ("read", data / "admin-password"),
        ("read", data / "shared-password"),
        ("read", data / "cli-token"),
        ("read", data / "jupyterhub_cookie_secret"),
        ("read", data / "jupyterhub.sqlite"),
        ("list", data),
        ("list", data / "logs"),
        ("read", Path(bob["cwd"]) / "secret.txt"),
        ("list", bob["cwd"]),
        ("read", f"/proc/{hub.proc.pid}/environ"),  # type: ignore[union-attr]
        ("read", f"/proc/{server_pid(hub, 'bob')}/environ"),  # Bob's server: his API token
        ("signal", str(server_pid(hub, "bob"))),  # signal 0: may she stop it?
        ("signal", str(hub.proc.pid)),  # type: ignore[union-attr]
    ]
    seen = probe(hub, "mallory", token, targets)
    assert seen == {str(path): "refused" for _, path in targets}

    # A terminal runs as her account too, with her HOME, and is refused the same way.
    out = in_terminal(hub, "mallory", token, f"id -u; echo home=$HOME; cat {data / 'admin-password'}")
    me = whoami(hub, "mallory", token)
    assert re.search(rf"^{me['uid']}$", out, re.M), out
    assert f"home={me['cwd']}" in out, out
    assert "Permission denied" in out, out
    assert (data / "admin-password").read_text().strip() not in out


def test_servers_run_as_accounts_of_their_own(hub: Hub) -> None:
    start(hub, "mallory")
    me = whoami(hub, "mallory", hub.user_token("mallory"))
    assert me["uid"] != 0 and me["euid"] != 0 and me["gid"] != 0, me
    assert 0 not in me["groups"], me
    assert me["name"] == f"{hub.account_prefix}mallory"
    account = pwd.getpwnam(me["name"])
    assert account.pw_shell == "/bin/bash", "terminals need a real shell"
    assert me["user"] == me["name"] and me["shell"] == "/bin/bash"
    assert me["home"] == me["cwd"], "HOME is the workspace"

    workspace = os.stat(me["cwd"])
    assert workspace.st_uid == me["uid"], "the workspace belongs to her account"
    assert stat.S_IMODE(workspace.st_mode) == 0o700
    # The process the hub started (not just its kernels) runs as her account.
    assert os.stat(f"/proc/{server_pid(hub, 'mallory')}").st_uid == me["uid"]

    # Server logs are the hub's: nobody else reads them.
    logs = hub.data_dir / "logs"
    assert stat.S_IMODE(logs.stat().st_mode) & 0o077 == 0
    for log in logs.iterdir():
        assert stat.S_IMODE(log.stat().st_mode) & 0o077 == 0, log


ODD_NAMES = [
    pytest.param("o'neil+lab@example.org", id="punctuation"),
    pytest.param("x" * 70, id="longer-than-useradd-allows"),
    pytest.param("root", id="root"),
    pytest.param("Ünïcode", id="unicode"),
]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_user_names_map_to_safe_accounts(hub: Hub, name: str) -> None:
    from dolab_spawner.backends.system_users import account_name

    start(hub, name)
    normalized = hub.user(name)["name"]
    me = whoami(hub, normalized, hub.user_token(normalized))
    assert me["uid"] != 0, me
    assert me["name"] == account_name(normalized, hub.account_prefix)
    assert re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", me["name"]), me["name"]
    hub.stop_server(normalized)


def test_two_concurrent_spawns_of_one_user_make_one_account(hub: Hub) -> None:
    hub.create_user("dora")
    replies = {}

    def spawn(server: str) -> None:
        replies[server] = hub.start_server("dora", {}, name=server)

    threads = [threading.Thread(target=spawn, args=(s,)) for s in ("", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r.status_code in (201, 202) for r in replies.values()), {s: r.text for s, r in replies.items()}
    for s in ("", "second"):
        hub.wait_ready("dora", s)
    token = hub.user_token("dora")
    seen = {s: whoami(hub, "dora", token, server=s) for s in ("", "second")}
    assert seen[""]["uid"] == seen["second"]["uid"] != 0
    accounts = [p for p in pwd.getpwall() if p.pw_name == f"{hub.account_prefix}dora"]
    assert len(accounts) == 1
    for s in ("", "second"):
        hub.stop_server("dora", s)


def test_a_workspace_root_made_earlier_is_handed_over_without_following_links(hub: Hub) -> None:
    from dolab_spawner.spawner import workspace_name

    outside = hub.root / "outside"
    outside.mkdir()
    (outside / "hub-secret").write_text("root only")
    (outside / "hub-secret").chmod(0o600)
    workspace = hub.data_dir / "workspaces" / workspace_name("legacy")
    (workspace / "notes").mkdir(parents=True)
    workspace.chmod(0o755)
    (workspace / "notes" / "a.txt").write_text("mine")
    (workspace / "link-to-file").symlink_to(outside / "hub-secret")
    (workspace / "link-to-dir").symlink_to(outside)

    start(hub, "legacy")
    token = hub.user_token("legacy")
    me = whoami(hub, "legacy", token)
    assert Path(me["cwd"]) == workspace
    for path in (workspace, workspace / "notes", workspace / "notes" / "a.txt", workspace / "link-to-file"):
        assert os.lstat(path).st_uid == me["uid"], path
    assert stat.S_IMODE(workspace.stat().st_mode) == 0o700
    # What the links point at stays the hub's.
    for path in (outside, outside / "hub-secret"):
        assert os.lstat(path).st_uid == 0, path
    seen = probe(
        hub, "legacy", token, [("read", "notes/a.txt"), ("read", "link-to-file"), ("read", "link-to-dir/hub-secret")]
    )
    assert seen == {"notes/a.txt": "read", "link-to-file": "refused", "link-to-dir/hub-secret": "refused"}
    hub.stop_server("legacy")


def test_root_servers_need_the_admins_opt_in(tmp_path: Path) -> None:
    # Turning accounts off without saying "root servers are fine" stops the hub with a sentence.
    refused = Hub(tmp_path / "off", overlay=OVERLAY + "c.LocalProcessBackend.system_users = False\n")
    with pytest.raises(RuntimeError, match="as root"):
        refused.start()
    refused.shutdown()

    hub = Hub(tmp_path / "opt-in", overlay=OVERLAY, env={"DOLAB_ALLOW_ROOT_SERVERS": "1"}).start()
    try:
        assert re.search(r"WARNING.*root", hub.log_path.read_text()), "the opt-in must be visible in the log"
        start(hub, "trent")
        assert whoami(hub, "trent", hub.user_token("trent"))["uid"] == 0
    finally:
        hub.shutdown()


# ----- restores (dolab-sync, running as root) end up the account's --------------------------------------------


@pytest.fixture(scope="module")
def sync_hub(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811 - the fixture above
    env = {**s3_server.sync_env(), "DOLAB_SYNC_PORT": str(free_port())}
    hub = Hub(tmp_path_factory.mktemp("local-users-sync"), overlay=OVERLAY, env=env).start()
    yield hub
    hub.shutdown()


def sync_api(hub: Hub, token: str, method: str, path: str, **kwargs: object) -> requests.Response:
    url = f"{hub.url}/services/dolab-sync/api/{path}"
    return requests.request(method, url, headers={"Authorization": f"token {token}"}, timeout=120, **kwargs)  # type: ignore[arg-type]


def test_restored_files_belong_to_the_workspace_account(sync_hub: Hub) -> None:
    hub = sync_hub
    start(hub, "ruth")
    token = hub.user_token("ruth")
    me = whoami(hub, "ruth", token)
    workspace = Path(me["cwd"])
    run_in_kernel(hub.url, "ruth", token, "import os; os.makedirs('notes'); open('notes/keep.txt', 'w').write('mine')")
    made = sync_api(hub, token, "POST", "backup", json={})
    assert made.status_code == 200, made.text
    snapshot = made.json()["snapshot"] or made.json()["previous"]

    # Into the running server's workspace, in place and into a new folder.
    run_in_kernel(hub.url, "ruth", token, "import shutil; shutil.rmtree('notes')")
    for body in ({"paths": ["notes/keep.txt"]}, {"into": "recovered"}):
        reply = sync_api(hub, token, "POST", "restore", json={"snapshot": snapshot, **body})
        assert reply.status_code == 200, reply.text
    for rel in ("notes", "notes/keep.txt", "recovered", "recovered/notes/keep.txt"):
        assert os.lstat(workspace / rel).st_uid == me["uid"], rel

    # Into a new, empty workspace at spawn: made by the service (root), handed over before the server starts.
    hub.stop_server("ruth")
    shutil.rmtree(workspace)
    start(hub, "ruth")
    assert whoami(hub, "ruth", token)["uid"] == me["uid"]
    for rel in ("", "notes", "notes/keep.txt"):
        assert os.lstat(workspace / rel).st_uid == me["uid"], rel
    assert run_in_kernel(hub.url, "ruth", token, "print(open('notes/keep.txt').read())").strip() == "mine"
    hub.stop_server("ruth")
