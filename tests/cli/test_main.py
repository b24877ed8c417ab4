"""Tests for the ``dolab`` package root (:mod:`dolab_spawner.cli`): its exports, the parser, the hub URL both
commands default to, and the table they print."""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

import pytest

from dolab_spawner import __version__, cli
from dolab_spawner.cli import common, doctor, gpus, main
from dolab_spawner.cli.common import format_table

from ..cli_support import isolate_env


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No DO-LAB, hub, RunPod or proxy variables from the outside; a private data dir; no docker engine."""
    return isolate_env(monkeypatch, tmp_path)


# ----- what the package exports ---------------------------------------------------------------------------

#: What the single-module ``dolab_spawner.cli`` exported before it became a package.
FORMER_EXPORTS = (
    "CheckRow",
    "CliError",
    "SlotRow",
    "check_database",
    "check_docker",
    "check_gpus",
    "check_hub",
    "check_proxy",
    "check_runpod",
    "check_singleuser",
    "doctor_exit_code",
    "doctor_rows",
    "fetch_active_users",
    "find_token",
    "format_table",
    "local_inventory",
    "main",
    "mask_url",
    "slot_rows",
    "state_problem",
)


def test_the_package_exports_what_the_entry_point_needs() -> None:
    assert cli.__all__ == ["build_parser", "main"]
    [entry_point] = entry_points(group="console_scripts", name="dolab")
    assert entry_point.value == "dolab_spawner.cli:main"
    assert entry_point.load() is main


@pytest.mark.parametrize("module", [common, doctor, gpus], ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_each_module_exports_only_what_it_defines(module: ModuleType) -> None:
    for name in module.__all__:
        value = getattr(module, name)
        if callable(value):
            assert value.__module__ == module.__name__, name


def test_every_former_export_has_one_home() -> None:
    homes = {name: [m.__name__ for m in (cli, common, doctor, gpus) if name in m.__all__] for name in FORMER_EXPORTS}
    assert {name: len(found) for name, found in homes.items()} == dict.fromkeys(FORMER_EXPORTS, 1), homes


# ----- the parser and main() ------------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dolab {__version__}"


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "doctor" in out and "gpus" in out


@pytest.mark.parametrize("argv", [pytest.param([], id="no-command"), pytest.param(["frobnicate"], id="unknown")])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: dolab" in capsys.readouterr().err


# ----- the table formatter ---------------------------------------------------------------------------------


def test_format_table_pads_columns_and_draws_a_rule() -> None:
    text = format_table(("host", "index", "held by"), [("local", 0, "alice/big"), ("node2", 12, "free")])
    assert text.splitlines() == [
        "host   index  held by",
        "-----  -----  ---------",
        "local  0      alice/big",
        "node2  12     free",
    ]


def test_format_table_wraps_long_cells_within_their_column() -> None:
    text = format_table(("part", "found"), [("Hub", "one two three four"), ("X", "ok")], wrap_at=9)
    assert text.splitlines() == [
        "part  found",
        "----  -------",
        "Hub   one two",
        "      three",
        "      four",
        "X     ok",
    ]


def test_format_table_header_only_and_empty_cells() -> None:
    assert format_table(("a", "bb"), []) == "a  bb\n-  --"
    assert format_table(("a", "b"), [("", "x")]).splitlines()[2] == "   x"


def test_format_table_refuses_a_short_row() -> None:
    with pytest.raises(ValueError, match="2 columns"):
        format_table(("a", "b"), [("only one",)])


# ----- the hub URL both commands use -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, "http://127.0.0.1:8000", id="built-in-default"),
        pytest.param({"DOLAB_BIND_URL": "http://10.0.0.5:8081/lab/"}, "http://10.0.0.5:8081/lab/", id="bind-url"),
        pytest.param(
            {"DOLAB_HUB_URL": "https://hub.example", "DOLAB_BIND_URL": "http://10.0.0.5:8081"},
            "https://hub.example",
            id="hub-url-first",
        ),
        pytest.param(
            {"DOLAB_HUB_URL": "", "DOLAB_BIND_URL": "http://127.0.0.1:9000"},
            "http://127.0.0.1:9000",
            id="empty-hub-url-skipped",
        ),
        pytest.param({"DOLAB_BIND_URL": ""}, "http://127.0.0.1:8000", id="empty-bind-url-skipped"),
    ],
)
def test_default_hub_url(env: dict[str, str], expected: str) -> None:
    assert common.default_hub_url(env) == expected


@pytest.mark.parametrize("command", ["doctor", "gpus"])
def test_url_help_names_the_fallbacks(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "default: $DOLAB_HUB_URL, else $DOLAB_BIND_URL, else http://127.0.0.1:8000" in out


def test_backed_up_names_that_are_not_utf8_print_as_escapes() -> None:
    from dolab_spawner.cli.backups import _printable

    name = os.fsdecode(b"caf\xe9.txt")  # as the sync service's JSON carries it (a surrogate escape)
    assert _printable(name) == "caf\\xe9.txt"
    assert _printable("été ✓.txt") == "été ✓.txt"
