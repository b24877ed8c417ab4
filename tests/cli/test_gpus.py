"""Tests for ``dolab gpus`` (:mod:`dolab_spawner.cli.gpus`): the slot table, token discovery, the inventory,
and the command against a small real HTTP server on 127.0.0.1 playing the hub."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dolab_core.gpus import GpuSlot
from dolab_spawner.cli import main
from dolab_spawner.cli.common import CliError
from dolab_spawner.cli.gpus import (
    SlotRow,
    fetch_active_users,
    find_token,
    local_inventory,
    slot_rows,
    state_problem,
)

from ..cli_support import (
    A100_0,
    A100_1,
    INVENTORY,
    INVENTORY_JSON,
    REMOTE,
    isolate_env,
    unused_url,
)
from ..hub_double import HubDouble, serve_hub_double


def server(*slots: GpuSlot, profile: str = "a100", stop_at: str = "") -> dict[str, Any]:
    """A server model as the hub returns it with admin:server_state."""
    state = {"profile": profile, "backend": "local", "slots": [s.to_dict() for s in slots], "stop_at": stop_at}
    return {"name": "", "ready": True, "state": {**state, "backend_state": {"pid": 42}}}


def user(name: str, **servers: dict[str, Any]) -> dict[str, Any]:
    """A user model; ``default=`` is the default server (name "")."""
    return {"kind": "user", "name": name, "servers": {("" if k == "default" else k): v for k, v in servers.items()}}


def page(items: list[dict], next_offset: int | None = None, limit: int = 1) -> dict[str, Any]:
    """A page in the pagination media type; ``next.url`` names another host, which must not be used."""
    following = None
    if next_offset is not None:
        url = f"http://elsewhere.invalid/hub/api/users?state=active&offset={next_offset}&limit={limit}"
        following = {"offset": next_offset, "limit": limit, "url": url}
    return {"items": items, "_pagination": {"offset": 0, "limit": limit, "total": 2, "next": following}}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No DO-LAB, hub, RunPod or proxy variables from the outside; a private data dir; no docker engine."""
    return isolate_env(monkeypatch, tmp_path)


@pytest.fixture
def hub() -> Iterator[HubDouble]:
    with serve_hub_double() as double:
        yield double


@pytest.fixture
def closed_url() -> str:
    """A 127.0.0.1 URL where nothing listens."""
    return unused_url()


# ----- slot_rows -------------------------------------------------------------------------------------------


def summary(rows: list[SlotRow]) -> list[tuple[str, int, str, str, str]]:
    return [(r.host, r.index, r.held_by, r.profile, r.stop_at) for r in rows]


@pytest.mark.parametrize(
    ("users", "inventory", "expected"),
    [
        pytest.param(
            [],
            INVENTORY,
            [("local", 0, "free", "", ""), ("local", 1, "free", "", "")],
            id="all-free",
        ),
        pytest.param(
            [user("alice", default=server(A100_1, stop_at="2030-01-01T00:00:00Z"))],
            INVENTORY,
            [("local", 0, "free", "", ""), ("local", 1, "alice", "a100", "2030-01-01T00:00:00Z")],
            id="held",
        ),
        pytest.param(
            [user("bob", default=server(REMOTE, profile="h100"))],
            INVENTORY,
            [("local", 0, "free", "", ""), ("local", 1, "free", "", ""), ("node2", 0, "bob", "h100", "")],
            id="held-but-unknown",
        ),
        pytest.param(
            [user("carol", default=server(A100_0), big=server(A100_1, profile="two"))],
            INVENTORY,
            [("local", 0, "carol", "a100", ""), ("local", 1, "carol/big", "two", "")],
            id="one-user-two-servers",
        ),
        pytest.param(
            [user("dave", train=server(A100_0, A100_1, profile="x2")), user("erin", default=server())],
            INVENTORY,
            [("local", 0, "dave/train", "x2", ""), ("local", 1, "dave/train", "x2", "")],
            id="named-server-two-gpus-and-a-cpu-server",
        ),
        pytest.param(
            [user("frank", default=server(A100_0)), user("gina", lab=server(A100_0))],
            INVENTORY,
            [("local", 0, "frank", "a100", ""), ("local", 0, "gina/lab", "a100", ""), ("local", 1, "free", "", "")],
            id="claimed-twice-shows-both",
        ),
        pytest.param(
            [user("hank", default=server(A100_1))],
            [],
            [("local", 1, "hank", "a100", "")],
            id="no-inventory-lists-held-only",
        ),
        pytest.param(
            [user("ivy", default={"name": "", "state": {}}), user("jo", default={"name": "", "state": None})],
            INVENTORY,
            [("local", 0, "free", "", ""), ("local", 1, "free", "", "")],
            id="non-dolab-state-holds-nothing",
        ),
        pytest.param(
            [user("kim", default={"state": {"profile": "p", "slots": [{"index": "x"}, A100_0.to_dict()]}})],
            INVENTORY,
            [("local", 0, "kim", "p", ""), ("local", 1, "free", "", "")],
            id="malformed-slot-skipped",
        ),
    ],
)
def test_slot_rows(users: list[dict], inventory: list[GpuSlot], expected: list[tuple]) -> None:
    assert summary(slot_rows(users, inventory)) == expected


def test_slot_rows_prefers_the_inventory_data_for_a_held_gpu() -> None:
    renumbered = GpuSlot(3, A100_0.uuid, A100_0.name, 80.0)  # same GPU, index changed since the start
    [row] = slot_rows([user("alice", default=server(A100_0))], [renumbered])
    assert (row.index, row.uuid, row.held_by) == (3, "GPU-aaaa", "alice")


def test_slot_row_cells_and_json() -> None:
    held = SlotRow("local", 1, "GPU-bbbb", "NVIDIA A100-SXM4-80GB", 80.0, "alice", "big", "a100", "")
    free = SlotRow("node2", 0, "GPU-cccc", "NVIDIA H100 80GB HBM3", 79.6)
    assert held.cells() == ("local", "1", "NVIDIA A100-SXM4-80GB", "80 GB", "alice/big", "a100", "-")
    assert free.cells()[3:5] == ("79.6 GB", "free")
    assert held.to_dict()["held_by"] == "alice/big"
    assert free.to_dict()["held_by"] is None
    assert free.to_dict()["uuid"] == "GPU-cccc"


@pytest.mark.parametrize(
    ("users", "needs"),
    [
        pytest.param([user("alice", default=server(A100_0))], None, id="state-visible"),
        pytest.param([], None, id="no-users"),
        pytest.param([{"name": "alice"}], "read:servers", id="no-servers-key"),
        pytest.param([user("alice", default={"name": "", "ready": True})], "admin:server_state", id="no-state"),
    ],
)
def test_state_problem(users: list[dict], needs: str | None) -> None:
    problem = state_problem(users)
    if needs is None:
        assert problem is None
    else:
        assert problem is not None and needs in problem


# ----- token discovery -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "env", "file_text", "expected"),
    [
        pytest.param(
            "from-flag", {"JUPYTERHUB_API_TOKEN": "from-env"}, "from-file", ("from-flag", "--token"), id="flag"
        ),
        pytest.param(
            None, {"JUPYTERHUB_API_TOKEN": "from-env"}, "from-file", ("from-env", "JUPYTERHUB_API_TOKEN"), id="env"
        ),
        pytest.param(None, {}, "from-file\n", ("from-file", "FILE"), id="file"),
        pytest.param("  ", {"JUPYTERHUB_API_TOKEN": " "}, "from-file", ("from-file", "FILE"), id="blanks-skipped"),
        pytest.param(None, {}, None, None, id="none"),
        pytest.param(None, {}, "\n", None, id="empty-file"),
    ],
)
def test_find_token_order(
    tmp_path: Path, flag: str | None, env: dict[str, str], file_text: str | None, expected: tuple | None
) -> None:
    token_file = tmp_path / "cli-token"
    if file_text is not None:
        token_file.write_text(file_text)
    if expected is not None and expected[1] == "FILE":
        expected = (expected[0], str(token_file))
    assert find_token(flag, env, str(tmp_path)) == expected


def test_find_token_unreadable_file_is_a_sentence(tmp_path: Path) -> None:
    (tmp_path / "cli-token").mkdir()  # unreadable as a file, even for root
    with pytest.raises(CliError, match=r"Cannot read .*cli-token.*--token"):
        find_token(None, {}, str(tmp_path))


# ----- dolab gpus ------------------------------------------------------------------------------------------


def run_gpus(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["gpus", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_sentence(err: str, *words: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dolab: ")
    for word in words:
        assert word in lines[0]


def test_gpus_follows_pages_and_lists_every_slot(
    hub: HubDouble, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOLAB_GPU_INVENTORY", INVENTORY_JSON)
    pages = {
        "0": page([user("alice", default=server(A100_0, stop_at="2030-01-01T00:00:00Z"))], next_offset=1),
        "1": page([user("bob", big=server(REMOTE, profile="h100"))]),
    }
    hub.respond = lambda method, path, query, body: (200, pages[query.get("offset", ["0"])[0]])

    code, out, err = run_gpus(capsys, "--url", hub.url, "--token", "secret-token")

    assert (code, err) == (0, "")
    assert [(r["path"], r["query"]) for r in hub.requests] == [
        ("/hub/api/users", {"state": ["active"]}),
        ("/hub/api/users", {"state": ["active"], "offset": ["1"], "limit": ["1"]}),
    ]
    for request in hub.requests:
        assert request["headers"]["Accept"] == "application/jupyterhub-pagination+json"
        assert request["headers"]["Authorization"] == "token secret-token"
    lines = out.splitlines()
    assert lines[0].split() == ["host", "index", "name", "memory", "held", "by", "profile", "stop_at"]
    assert lines[2].split() == [
        "local",
        "0",
        "NVIDIA",
        "A100-SXM4-80GB",
        "80",
        "GB",
        "alice",
        "a100",
        "2030-01-01T00:00:00Z",
    ]
    assert lines[3].split() == ["local", "1", "NVIDIA", "A100-SXM4-80GB", "80", "GB", "free", "-", "-"]
    assert lines[4].split() == ["node2", "0", "NVIDIA", "H100", "80GB", "HBM3", "79.6", "GB", "bob/big", "h100", "-"]
    assert lines[-1] == "2 of 3 GPU(s) held."


def test_gpus_json(hub: HubDouble, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DOLAB_GPU_INVENTORY", INVENTORY_JSON)
    monkeypatch.setenv("DOLAB_HUB_URL", hub.url)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "env-token")
    hub.respond = lambda method, path, query, body: (200, page([user("alice", lab=server(A100_1))]))

    code, out, _ = run_gpus(capsys, "--json")

    assert code == 0
    rows = json.loads(out)
    assert [(r["index"], r["held_by"], r["server"]) for r in rows] == [(0, None, ""), (1, "alice/lab", "lab")]
    assert rows[1]["uuid"] == "GPU-bbbb"
    assert hub.requests[0]["headers"]["Authorization"] == "token env-token"


def test_gpus_reads_the_token_file_in_the_data_dir(
    hub: HubDouble, clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.mkdir()
    (clean_env / "cli-token").write_text("file-token\n")
    monkeypatch.setenv("DOLAB_GPU_INVENTORY", INVENTORY_JSON)
    hub.respond = lambda method, path, query, body: (200, page([]))
    code, out, _ = run_gpus(capsys, "--url", hub.url)
    assert code == 0
    assert "0 of 2 GPU(s) held." in out
    assert hub.requests[0]["headers"]["Authorization"] == "token file-token"


def test_gpus_403_says_which_scopes(hub: HubDouble, capsys: pytest.CaptureFixture[str]) -> None:
    hub.respond = lambda method, path, query, body: (403, {"status": 403, "message": "Action is not authorized"})
    code, out, err = run_gpus(capsys, "--url", hub.url, "--token", "weak")
    assert (code, out) == (2, "")
    assert_one_sentence(err, "HTTP 403", "list:users", "admin:server_state")
    assert "weak" not in err


def test_gpus_hub_down(closed_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_gpus(capsys, "--url", closed_url, "--token", "t")
    assert code == 2
    assert_one_sentence(err, f"No hub answers at {closed_url}", "Connection refused")


def test_gpus_hub_too_slow(hub: HubDouble, capsys: pytest.CaptureFixture[str]) -> None:
    hub.delay_seconds = 2
    hub.respond = lambda method, path, query, body: (200, page([]))
    code, _, err = run_gpus(capsys, "--url", hub.url, "--token", "t", "--timeout", "0.3")
    assert code == 2
    assert_one_sentence(err, "did not answer in 0.3 s")


def test_gpus_without_a_token(capsys: pytest.CaptureFixture[str], closed_url: str) -> None:
    code, _, err = run_gpus(capsys, "--url", closed_url)
    assert code == 2
    assert_one_sentence(err, "No API token", "--token", "JUPYTERHUB_API_TOKEN", "cli-token")


@pytest.mark.parametrize(
    ("status", "answer", "words"),
    [
        pytest.param(
            200, page([user("alice", default={"name": "", "ready": True})]), ["admin:server_state"], id="no-state"
        ),
        pytest.param(200, page([{"kind": "user", "name": "alice"}]), ["read:servers"], id="no-servers"),
        pytest.param(200, b"<html>a login page</html>", ["not a JupyterHub user list"], id="not-json"),
        pytest.param(404, b"<html>nope</html>", ["HTTP 404", "--url"], id="not-found"),
        pytest.param(500, {"status": 500}, ["HTTP 500"], id="server-error"),
    ],
)
def test_gpus_other_errors(
    hub: HubDouble, capsys: pytest.CaptureFixture[str], status: int, answer: Any, words: list[str]
) -> None:
    hub.respond = lambda method, path, query, body: (status, answer)
    code, out, err = run_gpus(capsys, "--url", hub.url, "--token", "t")
    assert (code, out) == (2, "")
    assert_one_sentence(err, *words)


def test_gpus_bad_inventory_is_a_sentence(
    hub: HubDouble, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOLAB_GPU_INVENTORY", '{"index": 0}')
    hub.respond = lambda method, path, query, body: (200, page([]))
    code, _, err = run_gpus(capsys, "--url", hub.url, "--token", "t")
    assert code == 2
    assert_one_sentence(err, "DOLAB_GPU_INVENTORY")


def test_gpus_falls_back_to_the_bind_url(
    hub: HubDouble, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOLAB_BIND_URL", hub.url)  # where the shipped config binds the hub; no DOLAB_HUB_URL
    monkeypatch.setenv("DOLAB_GPU_INVENTORY", INVENTORY_JSON)
    hub.respond = lambda method, path, query, body: (200, page([user("alice", default=server(A100_0))]))
    code, out, err = run_gpus(capsys, "--token", "t")
    assert (code, err) == (0, "")
    assert [r["path"] for r in hub.requests] == ["/hub/api/users"]
    assert out.splitlines()[-1] == "1 of 2 GPU(s) held."


def test_gpus_url_flag_beats_the_environment(
    hub: HubDouble, closed_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOLAB_HUB_URL", closed_url)
    monkeypatch.setenv("DOLAB_BIND_URL", closed_url)
    hub.respond = lambda method, path, query, body: (200, page([]))
    code, _, err = run_gpus(capsys, "--url", hub.url, "--token", "t")
    assert (code, err) == (0, "")
    assert len(hub.requests) == 1


def test_fetch_stops_on_a_page_that_does_not_move_on(hub: HubDouble) -> None:
    stuck = {"items": [user("alice")], "_pagination": {"next": {"offset": 0, "limit": 1, "url": "x"}}}
    hub.respond = lambda method, path, query, body: (200, stuck)
    assert [u["name"] for u in fetch_active_users(hub.url, "t", 5)] == ["alice"]
    assert len(hub.requests) == 1


def test_fetch_accepts_a_plain_list(hub: HubDouble) -> None:
    hub.respond = lambda method, path, query, body: (200, [user("alice"), "junk"])
    assert [u["name"] for u in fetch_active_users(hub.url, "t", 5)] == ["alice"]


# ----- the inventory dolab gpus uses -----------------------------------------------------------------------


def never_called() -> list[GpuSlot]:
    raise AssertionError("NVML must not be read when DOLAB_GPU_INVENTORY is set")


@pytest.mark.parametrize(
    ("env", "read", "expected"),
    [
        pytest.param({"DOLAB_GPU_INVENTORY": INVENTORY_JSON}, never_called, INVENTORY, id="static-replaces-nvml"),
        pytest.param({}, lambda: [REMOTE], [REMOTE], id="nvml"),
        pytest.param(
            {"DOLAB_GPU_INVENTORY": INVENTORY_JSON, "DOLAB_GPU_IDS": "1"}, never_called, [A100_1], id="ids-static"
        ),
        pytest.param({"DOLAB_GPU_IDS": "GPU-bbbb"}, lambda: INVENTORY, [A100_1], id="ids-nvml-by-uuid"),
        pytest.param({}, list, [], id="no-gpus"),
    ],
)
def test_local_inventory(env: dict[str, str], read: Callable[[], list[GpuSlot]], expected: list[GpuSlot]) -> None:
    assert local_inventory(env, read=read) == expected


def test_local_inventory_nvml_failure_lists_held_only(capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> list[GpuSlot]:
        raise RuntimeError("GPU is lost")

    assert local_inventory({}, read=broken) == []
    assert "GPU is lost" in capsys.readouterr().err
