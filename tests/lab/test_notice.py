"""The culler's JupyterLab notice: what reaches users' servers (JUPYTER_PATH, a read-only mount), the switch,
the one log line when it is not built, and what one click on "Extend" offers.

The notice itself runs in a real JupyterLab in tests/e2e/test_culler_notice.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from traitlets.config import Config

from dolab_lab import notice as labnotice
from dolab_lab.notice import CONTAINER_DIR, NOTICE_NAME, SHARE_DIR, built_notice, with_jupyter_path
from dolab_spawner.backends.base import child_config
from dolab_spawner.backends.docker import DockerBackend
from dolab_spawner.backends.local import LocalProcessBackend
from dolab_spawner.spawner import DoLabSpawner

SEP = os.pathsep


@pytest.fixture
def share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A built notice in a share directory of its own, which the backends use."""
    folder = tmp_path / "share"
    (folder / "labextensions" / NOTICE_NAME).mkdir(parents=True)
    (folder / "labextensions" / NOTICE_NAME / "package.json").write_text("{}")
    monkeypatch.setattr(labnotice, "SHARE_DIR", folder)
    monkeypatch.setattr(labnotice, "_missing_reported", set())
    return folder


@pytest.fixture
def unbuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "nothing-built"
    monkeypatch.setattr(labnotice, "SHARE_DIR", folder)
    monkeypatch.setattr(labnotice, "_missing_reported", set())
    return folder


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        pytest.param("", "/n", id="unset"),
        pytest.param("/admin", f"/admin{SEP}/n", id="after the admin's entry"),
        pytest.param(f"/a{SEP}/n{SEP}/b", f"/a{SEP}/n{SEP}/b", id="already there"),
        pytest.param(f"{SEP}/a{SEP}", f"/a{SEP}/n", id="empty entries dropped"),
    ],
)
def test_with_jupyter_path(current: str, expected: str) -> None:
    assert with_jupyter_path(current, "/n") == expected


def test_built_notice_found(share: Path) -> None:
    assert built_notice() == share


def test_a_missing_build_is_logged_once_with_how_to_build_it(unbuilt: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.labnotice")
    with caplog.at_level(logging.WARNING, logger="test.labnotice"):
        assert built_notice(log=log) is None
        assert built_notice(log=log) is None
    (record,) = caplog.records
    assert "make labextension" in record.getMessage() and "servers start without it" in record.getMessage()


# ----- the local backend ------------------------------------------------------------------------------------


def local_backend(config: Config | None = None, **traits: Any) -> LocalProcessBackend:
    return LocalProcessBackend(
        config=config or Config(),
        hub=SimpleNamespace(public_host="", api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/"),
        user=SimpleNamespace(name="alice", escaped_name="alice", url="/user/alice/"),
        workspace_dir="/tmp/dolab-test-workspace",
        **traits,
    )


def test_a_local_server_finds_the_notice_on_jupyter_path(share: Path) -> None:
    config = Config()
    config.LocalProcessBackend.environment = {"JUPYTER_PATH": "/admins/own"}
    env = local_backend(config).get_env()
    assert env["JUPYTER_PATH"] == f"/admins/own{SEP}{share}"


def test_a_missing_build_leaves_the_server_as_it_was(unbuilt: Path) -> None:
    assert "JUPYTER_PATH" not in local_backend().get_env()


def test_lab_notice_off_from_dolabspawners_section(share: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = Config()
    config.DoLabSpawner.lab_notice = False
    with caplog.at_level(logging.WARNING):
        spawner = DoLabSpawner(config=config)
        backend = local_backend(child_config(config, LocalProcessBackend, DoLabSpawner))
    assert spawner.lab_notice is False and backend.lab_notice is False
    assert "not recognized" not in caplog.text
    assert "JUPYTER_PATH" not in backend.get_env()


def test_lab_notice_off_per_profile(share: Path) -> None:
    assert "JUPYTER_PATH" not in local_backend(lab_notice=False).get_env()


# ----- the docker backend -----------------------------------------------------------------------------------


def test_a_container_on_this_machine_gets_the_notice_read_only(share: Path) -> None:
    backend = DockerBackend(config=Config(), docker_host={"name": "local"})
    source = str(share / "labextensions" / NOTICE_NAME)
    assert backend._notice_volume() == {source: {"bind": CONTAINER_DIR, "mode": "ro"}}
    assert CONTAINER_DIR.startswith("/usr/local/share/jupyter/labextensions/"), "a path every Jupyter searches"


@pytest.mark.parametrize(
    "traits",
    [
        pytest.param({"docker_host": {"name": "gpu-box", "url": "tcp://10.0.0.2:2376"}}, id="another machine"),
        pytest.param({"docker_host": {"name": "local"}, "lab_notice": False}, id="switched off"),
    ],
)
def test_no_notice_mount(share: Path, traits: dict[str, Any]) -> None:
    assert DockerBackend(config=Config(), **traits)._notice_volume() == {}


def test_no_mount_without_a_build(unbuilt: Path) -> None:
    assert DockerBackend(config=Config(), docker_host={"name": "local"})._notice_volume() == {}


# ----- the notice's own pure parts (src/text.ts), run in Node -------------------------------------------------

LABEXT = SHARE_DIR.parent / "labextension"
JS_CASES = """
const t = require(process.argv[1]);
const now = Date.parse('2030-01-01T12:00:00Z');
const warning = (reason, stop_at) => ({server: '', reason, stop_at, message: 'the culler says so'});
console.log(JSON.stringify({
  bases: [
    t.cullerBase('/hub/', '', 'http://h'),
    t.cullerBase('/jupyter/hub/', '', 'http://h'),
    t.cullerBase('/jupyter/hub', '', 'http://h'),
    t.cullerBase('/hub/', 'http://h', 'http://h'),
    t.cullerBase('/hub/', 'https://hub.example.org', 'https://alice.example.org'),
    t.cullerBase('', '', 'http://h'),
  ],
  texts: [
    t.describe(warning('deadline', '2030-01-01T12:09:00Z'), now),
    t.describe(warning('idle', '2030-01-01T12:00:20Z'), now),
    t.describe(warning('max_age', '2030-01-01T15:00:00Z'), now),
    t.describe(warning('quota', '2030-01-01T12:09:00Z'), now),
  ],
  labels: [t.extendLabel(2), t.extendLabel(1), t.extendLabel(0.5)],
}));
"""


def test_the_notice_text_and_address_in_node(tmp_path: Path) -> None:
    node, tsc = shutil.which("node"), LABEXT / "node_modules" / ".bin" / "tsc"
    if node is None or not tsc.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("Node or the notice's build tools are missing: `make labextension` installs them")
        pytest.skip("Node or the notice's build tools are missing (`make labextension` installs them)")
    compiled = tmp_path / "js"
    subprocess.run(
        [
            str(tsc),
            "--module",
            "commonjs",
            "--target",
            "ES2020",
            "--outDir",
            str(compiled),
            str(LABEXT / "src" / "text.ts"),
        ],
        check=True,
        timeout=120,
    )
    out = subprocess.run(
        [node, "-e", JS_CASES, str(compiled / "text.js")],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TZ": "UTC", "LANG": "C"},
    ).stdout
    result = json.loads(out)
    assert result["bases"] == [
        "/services/dolab-culler/",
        "/jupyter/services/dolab-culler/",
        "/jupyter/services/dolab-culler/",
        "/services/dolab-culler/",
        None,  # the hub on another origin: its cookies are out of reach
        None,  # not under JupyterHub
    ]
    deadline, idle, max_age, other = result["texts"]
    assert deadline.startswith("This server stops at ") and deadline.endswith("(in 9 min): the stop time you chose.")
    assert "12:09" in deadline, "the user's clock (UTC here)"
    assert idle.endswith("(in a minute): it has been idle.")
    assert max_age.endswith("(in 3 h): it has run as long as its profile allows. Save your work.")
    assert other == "the culler says so", "an unknown reason: the culler's own sentence"
    assert all(len(text) <= 140 for text in result["texts"]), "a toast shows at most 140 characters"
    assert result["labels"] == ["Extend by 2 hours", "Extend by 1 hour", "Extend by 0.5 hours"]
