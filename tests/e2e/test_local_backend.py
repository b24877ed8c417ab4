"""End to end on a real hub, real configurable-http-proxy and real single-user servers (local backend).

Two fake GPUs come from a static ``gpu_inventory``; what a server "sees" is read from inside it, by running
code in a kernel through the proxy.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from .hub import GPU_INVENTORY, Hub
from .jupyter import run_in_kernel

pytestmark = pytest.mark.e2e

UUIDS = {g["uuid"] for g in GPU_INVENTORY}
SHOW_GPUS = "import os, sys; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')), sys.prefix)"


def make_venv(path: Path) -> Path:
    """A real venv whose Python finds the test environment's packages (hub, lab) through a .pth file."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    purelib = sysconfig.get_paths()["purelib"]
    site = next(path.glob("lib/python3*/site-packages"))
    (site / "outer.pth").write_text(purelib + "\n")
    script = path / "bin" / "jupyterhub-singleuser"
    script.write_text(f"#!{path}/bin/python\nimport sys\nfrom jupyterhub.singleuser import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub")
    venv = make_venv(root / "torch-env")
    profiles = [
        {"display_name": "CPU only", "slug": "cpu", "default": True},
        {
            "display_name": "One A100",
            "slug": "a100",
            "gpus": 1,
            "gpu_type": "A100",
            "profile_options": {
                "env": {
                    "display_name": "Python environment",
                    "choices": {
                        "system": {"display_name": "System Python", "default": True},
                        "torch": {"display_name": "PyTorch env", "spawner_override": {"python_env": str(venv)}},
                    },
                }
            },
        },
        {"display_name": "Two A100s", "slug": "pair", "gpus": 2, "gpu_type": "A100"},
        {"display_name": "One H100", "slug": "h100", "gpus": 1, "gpu_type": "H100"},
        {"display_name": "Broken", "slug": "broken", "gpus": 1, "spawner_override": {"cmd": ["false"]}},
    ]
    overlay = (
        f"c.DoLabSpawner.profile_list = {profiles!r}\n"
        "c.DoLabSpawner.max_run_hours = 24\n"
        f"c.DoLabSpawner.gpu_inventory = {GPU_INVENTORY!r}\n"
    )
    hub = Hub(root, overlay=overlay).start()
    yield hub
    hub.shutdown()


def gpus_seen(hub: Hub, user: str) -> tuple[str, str]:
    """(CUDA_VISIBLE_DEVICES, sys.prefix) as a kernel of ``user``'s server sees them."""
    out = run_in_kernel(hub.url, user, hub.user_token(user), SHOW_GPUS)
    visible, prefix = out.strip().rsplit(" ", 1)
    return eval(visible), prefix  # repr of a str or None, printed by our own code


def held_slots(hub: Hub) -> dict[str, str]:
    """uuid -> "user/server" for every slot recorded in the hub's server state."""
    held = {}
    for user in hub.users():
        for name, server in user["servers"].items():
            for slot in (server.get("state") or {}).get("slots", []):
                held[slot["uuid"]] = f"{user['name']}/{name}"
    return held


def in_hours(hours: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


BAD_OPTIONS = [
    pytest.param({"profile": "tpu"}, "Unknown profile 'tpu'", id="unknown-profile"),
    pytest.param({"profile": 3}, "profile must be a string", id="profile-wrong-type"),
    pytest.param({"profile": "a100", "env": "conda"}, "not a choice for 'env'", id="unknown-choice"),
    pytest.param({"profile": "a100", "gpus": 2}, "at most 1 GPU", id="more-gpus-than-profile"),
    pytest.param({"profile": "a100", "gpus": "two"}, "gpus must be a whole number", id="gpus-wrong-type"),
    pytest.param({"profile": "cpu", "gpus": 1}, "has no GPUs", id="gpus-on-cpu"),
    pytest.param({"profile": "cpu", "image": "evil"}, "Unknown option(s) 'image'", id="unknown-key"),
    pytest.param({"profile": "cpu", "stop_at": "2001-01-01T00:00:00Z"}, "in the past", id="stop-in-past"),
    pytest.param({"profile": "cpu", "stop_at": in_hours(48)}, "too far ahead", id="stop-past-max"),
    pytest.param({"profile": "cpu", "stop_at": "tomorrow"}, "not an ISO 8601 time", id="stop-not-iso"),
    pytest.param({"profile": "cpu", "run_hours": 100}, "at most 24 hours", id="run-hours-past-max"),
]


@pytest.mark.parametrize(("options", "phrase"), BAD_OPTIONS)
def test_bad_user_options_are_refused_and_change_nothing(hub: Hub, options: dict, phrase: str) -> None:
    hub.create_user("mallory")
    reply = hub.start_server("mallory", options)
    assert reply.status_code == 400, reply.text
    assert phrase in reply.json()["message"]
    assert hub.user("mallory")["servers"] == {}, "no server may be left behind"
    assert held_slots(hub) == {}, "no slot may stay reserved"


def test_refused_options_do_not_replace_the_stored_ones(hub: Hub) -> None:
    hub.create_user("carol")
    assert hub.start_server("carol", {"profile": "cpu", "run_hours": 2}).status_code in (201, 202)
    hub.wait_ready("carol")
    hub.stop_server("carol")
    assert hub.start_server("carol", {"profile": "nope"}).status_code == 400
    # No options: the hub reuses the stored ones, which must still be the good CPU ones.
    reply = hub.start_server("carol", None)
    assert reply.status_code in (201, 202), reply.text
    server = hub.wait_ready("carol")
    assert server["user_options"]["profile"] == "cpu"
    assert server["user_options"]["run_hours"] == 2
    hub.stop_server("carol")


def test_concurrent_gpu_spawns_restart_and_release(hub: Hub) -> None:
    users = ["alice", "bob", "dave"]
    for user in users:
        hub.create_user(user)
    barrier = threading.Barrier(len(users))
    replies: dict[str, object] = {}

    def spawn(user: str) -> None:
        barrier.wait()
        replies[user] = hub.start_server(user, {"profile": "a100"})

    threads = [threading.Thread(target=spawn, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = {u: r.status_code for u, r in replies.items()}  # type: ignore[attr-defined]
    started = sorted(u for u, code in codes.items() if code in (201, 202))
    refused = [u for u, code in codes.items() if code == 409]
    assert len(started) == 2 and len(refused) == 1, codes
    message = replies[refused[0]].json()["message"]  # type: ignore[attr-defined]
    assert "All 2 A100 GPU(s) are in use" in message and "try again" in message

    seen = {}
    for user in started:
        server = hub.wait_ready(user)
        assert server["user_options"]["profile"] == "a100"
        visible, _ = gpus_seen(hub, user)
        assert visible in UUIDS, f"{user} must see exactly one of the fake GPUs, not {visible!r}"
        seen[user] = visible
    assert len(set(seen.values())) == 2, f"two servers share a GPU: {seen}"
    assert held_slots(hub) == {uuid: f"{user}/" for user, uuid in seen.items()}

    # A hub restart keeps both servers, both slots, and the refusal.
    pids = {u: hub.user(u)["servers"][""]["state"]["backend_state"]["pid"] for u in started}
    hub.restart()
    for user in started:
        hub.wait_ready(user)
        assert hub.user(user)["servers"][""]["state"]["backend_state"]["pid"] == pids[user]
        assert gpus_seen(hub, user)[0] == seen[user], "the server must still hold its GPU after the restart"
    again = hub.start_server(refused[0], {"profile": "a100"})
    assert again.status_code == 409, again.text

    # Stopping one frees its GPU for the user who was refused.
    hub.stop_server(started[0])
    reply = hub.start_server(refused[0], {"profile": "a100"})
    assert reply.status_code in (201, 202), reply.text
    hub.wait_ready(refused[0])
    assert gpus_seen(hub, refused[0])[0] == seen[started[0]]
    for user in (started[1], refused[0]):
        hub.stop_server(user)
    assert held_slots(hub) == {}


def test_cpu_profile_sees_no_gpu(hub: Hub) -> None:
    hub.create_user("erin")
    assert hub.start_server("erin", {}).status_code in (201, 202)
    server = hub.wait_ready("erin")
    assert server["user_options"] == {"profile": "cpu"}
    assert gpus_seen(hub, "erin")[0] == ""
    hub.stop_server("erin")


def test_profile_python_environment(hub: Hub) -> None:
    hub.create_user("frank")
    reply = hub.start_server("frank", {"profile": "a100", "env": "torch"})
    assert reply.status_code in (201, 202), reply.text
    hub.wait_ready("frank")
    visible, prefix = gpus_seen(hub, "frank")
    assert prefix == str(hub.root / "torch-env"), "the kernel must run the profile's Python environment"
    assert visible in UUIDS
    hub.stop_server("frank")


def test_no_matching_gpu_and_too_many_gpus_are_clear(hub: Hub) -> None:
    hub.create_user("gina")
    reply = hub.start_server("gina", {"profile": "h100"})
    assert reply.status_code == 409
    assert "no H100 GPU" in reply.json()["message"]
    hub.start_server("alice", {"profile": "a100"})
    hub.wait_ready("alice")
    reply = hub.start_server("gina", {"profile": "pair"})
    assert reply.status_code == 409
    assert "Only 1 of 2 A100 GPU(s) are free" in reply.json()["message"]
    hub.stop_server("alice")
    assert held_slots(hub) == {}


def test_server_dying_at_start_is_a_sentence_and_frees_the_gpu(hub: Hub) -> None:
    hub.create_user("hank")
    reply = hub.start_server("hank", {"profile": "broken"})
    assert reply.status_code == 503, reply.text
    assert "exited during start-up" in reply.json()["message"]
    assert hub.user("hank")["servers"] == {}
    assert held_slots(hub) == {}
    # Both GPUs are still there for others.
    for user in ("alice", "bob"):
        assert hub.start_server(user, {"profile": "a100"}).status_code in (201, 202)
    for user in ("alice", "bob"):
        hub.wait_ready(user)
        hub.stop_server(user)


def test_progress_stream_shows_the_phases(hub: Hub) -> None:
    hub.create_user("ivy")
    result: dict[str, object] = {}
    spawn = threading.Thread(target=lambda: result.update(reply=hub.start_server("ivy", {"profile": "a100"})))
    spawn.start()
    events = hub.progress_events("ivy")
    spawn.join(60)
    messages = [e["message"] for e in events]
    assert any(m.startswith("Checking your options") for m in messages), messages
    assert any(m.startswith("Reserved GPU") and "NVIDIA A100 80GB" in m for m in messages), messages
    assert any(m.startswith("Starting your server (One A100)") for m in messages), messages
    assert events[-1].get("ready"), events
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress)
    hub.wait_ready("ivy")
    hub.stop_server("ivy")


def test_stop_time_is_stored_in_user_options(hub: Hub) -> None:
    hub.create_user("jack")
    before = datetime.now(timezone.utc)
    assert hub.start_server("jack", {"profile": "cpu", "run_hours": 1.5}).status_code in (201, 202)
    server = hub.wait_ready("jack")
    stop_at = datetime.fromisoformat(server["user_options"]["stop_at"].replace("Z", "+00:00"))
    assert before + timedelta(hours=1.5) - timedelta(seconds=2) <= stop_at <= before + timedelta(hours=1.5, minutes=1)
    assert server["state"]["stop_at"] == server["user_options"]["stop_at"]
    hub.stop_server("jack")


def test_server_log_and_workspace(hub: Hub) -> None:
    hub.create_user("kim.o'neil@example.org")
    name = "kim.o'neil@example.org"
    assert hub.start_server(name, {}).status_code in (201, 202)
    hub.wait_ready(name)
    out = run_in_kernel(hub.url, name, hub.user_token(name), "import os; print(os.getcwd())")
    workspace = Path(out.strip())
    assert workspace.parent == hub.data_dir / "workspaces"
    assert "/" not in workspace.name and "." not in workspace.name and "'" not in workspace.name
    assert list((hub.data_dir / "logs").glob("*.log"))
    hub.stop_server(name)


def test_hub_restart_with_server_gone_frees_its_slot(hub: Hub) -> None:
    hub.create_user("liam")
    assert hub.start_server("liam", {"profile": "a100"}).status_code in (201, 202)
    hub.wait_ready("liam")
    pid = hub.user("liam")["servers"][""]["state"]["backend_state"]["pid"]
    hub.stop()
    subprocess.run(["kill", "-9", str(pid)], check=True)
    time.sleep(0.5)
    hub.start()
    assert "liam" not in {u["name"] for u in hub.users() if u["servers"]} or hub.user("liam")["servers"] == {}
    assert held_slots(hub) == {}
    for user in ("alice", "bob"):
        assert hub.start_server(user, {"profile": "a100"}).status_code in (201, 202), "both GPUs must be free"
    for user in ("alice", "bob"):
        hub.wait_ready(user)
        hub.stop_server(user)
