"""Tests for ``dolab pull`` (:mod:`dolab_spawner.cli.pull`): the images a config names, as tables; loading the
config; and real pulls on the test stack's engine, where no registry is reachable: an image already there is
"already present", any other fails fast with a reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

from dolab_spawner.cli import main
from dolab_spawner.cli.common import CliError
from dolab_spawner.cli.pull import PRESENT, configured_engines, configured_images, load_hub_config

from ..cli_support import isolate_env
from ..e2e.stack import docker_stack

PRESENT_IMAGE = "dolab-singleuser-test:latest"
MISSING_IMAGE = "dolab-test-missing:nope"
DEFAULT = "quay.io/jupyterhub/singleuser:6.1"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    return isolate_env(monkeypatch, tmp_path)


# ----- configured_images -----------------------------------------------------------------------------------


def docker_profile(image: str = "", **options: dict[str, str]) -> dict[str, Any]:
    """A docker profile; each keyword is an option whose choices map slug -> image ("" for none)."""
    profile: dict[str, Any] = {"display_name": "Docker", "backend": "docker"}
    if image:
        profile["spawner_override"] = {"image": image, "mem_limit": "8G"}
    if options:
        profile["profile_options"] = {
            name: {
                "display_name": name,
                "choices": {
                    slug: {"display_name": slug, **({"spawner_override": {"image": img}} if img else {})}
                    for slug, img in choices.items()
                },
            }
            for name, choices in options.items()
        }
    return profile


def config(profiles: Any = None, spawner_image: str = "", backend_image: str = "") -> Config:
    c = Config()
    if profiles is not None:
        c.DoLabSpawner.profile_list = profiles
    if spawner_image:
        c.DockerSpawner.image = spawner_image
    if backend_image:
        c.DockerBackend.image = backend_image
    return c


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        pytest.param(Config(), [], id="nothing"),
        pytest.param(config([{"display_name": "CPU"}]), [], id="local-profile-only"),
        pytest.param(config(lambda spawner: [docker_profile("a:1")]), [], id="callable-profile-list"),
        pytest.param(config(spawner_image="s:1"), ["s:1"], id="docker-spawner-image"),
        pytest.param(config(spawner_image="s:1", backend_image="b:1"), ["s:1", "b:1"], id="both-traits"),
        pytest.param(config([docker_profile("a:1")]), ["a:1"], id="profile-override"),
        pytest.param(
            config([docker_profile("a:1", env={"x": "x:1", "y": "y:1"}), docker_profile("a:1")]),
            ["a:1", "x:1", "y:1"],
            id="choices-in-order-once-each",
        ),
        pytest.param(config([docker_profile()]), [DEFAULT], id="docker-profile-gets-the-default"),
        pytest.param(config([docker_profile()], spawner_image="s:1"), ["s:1"], id="docker-profile-gets-spawner-image"),
        pytest.param(
            config([docker_profile()], spawner_image="s:1", backend_image="b:1"),
            ["s:1", "b:1"],
            id="backend-image-wins-fallback",
        ),
        pytest.param(
            config([docker_profile(env={"x": "x:1", "plain": ""})]),
            ["x:1", DEFAULT],
            id="a-choice-without-image-needs-the-default",
        ),
        pytest.param(
            config([docker_profile(env={"x": "x:1", "y": "y:1"}, size={"small": ""})]),
            ["x:1", "y:1"],
            id="every-start-has-an-image",
        ),
        pytest.param(
            config([{"display_name": "CPU", "spawner_override": {"image": "odd:1"}}]), ["odd:1"], id="any-profile"
        ),
    ],
)
def test_configured_images(cfg: Config, expected: list[str]) -> None:
    assert configured_images(cfg, DEFAULT) == expected


def test_configured_images_sees_appended_profiles() -> None:
    c = Config()
    c.DoLabSpawner.profile_list.append(docker_profile("a:1"))
    assert configured_images(c, DEFAULT) == ["a:1"]


def test_configured_engines() -> None:
    assert configured_engines(Config()) == [{"name": "local"}]
    c = Config()
    c.DoLabSpawner.docker_hosts = [{"name": "gpu2", "url": "tcp://10.0.0.2:2376"}]
    assert configured_engines(c) == [{"name": "gpu2", "url": "tcp://10.0.0.2:2376"}]
    c.DoLabSpawner.docker_hosts = [{"name": "bad name"}]
    with pytest.raises(CliError, match="docker_hosts in the hub config is not usable"):
        configured_engines(c)


# ----- loading the config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "import sys\nsys.exit('DO-LAB: bad configuration: oops')\n", "refused to load: DO-LAB: bad", id="exit"
        ),
        pytest.param("c.DockerSpawner.image = undefined_name\n", "failed to load .NameError", id="error"),
    ],
)
def test_load_hub_config_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "jupyterhub_config.py"
    path.write_text(text)
    with pytest.raises(CliError, match=message):
        load_hub_config(path)


def test_load_hub_config_hides_the_configs_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "jupyterhub_config.py"
    path.write_text("import sys\nprint('passwords here', file=sys.stderr)\nc.DockerSpawner.image = 'a:1'\n")
    assert configured_images(load_hub_config(path)) == ["a:1"]
    assert capsys.readouterr() == ("", "")


def test_the_shipped_config_names_the_images_of_docker_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    profiles = [{"display_name": "CPU"}, docker_profile("lab:1", env={"torch": "torch:2", "plain": ""})]
    monkeypatch.setenv("DOLAB_PROFILES", json.dumps(profiles))
    shipped = Path(__file__).resolve().parents[2] / "jupyterhub_config.py"
    assert configured_images(load_hub_config(shipped), DEFAULT) == ["lab:1", "torch:2"]


def test_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "--config", str(tmp_path / "nope.py")]) == 2
    assert capsys.readouterr().err.startswith("dolab: No hub config at")


def test_a_config_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "jupyterhub_config.py"
    path.write_text("c.JupyterHub.log_level = 'INFO'\n")
    assert main(["pull", "--config", str(path)]) == 2
    assert "names no Docker image" in capsys.readouterr().err


# ----- real pulls ------------------------------------------------------------------------------------------


def table(out: str) -> list[tuple[str, str, str]]:
    """``(image, engine, result)`` per row of the table (its continuation lines skipped)."""
    rows = []
    lines = out.splitlines()
    for line in lines[2:]:
        if not line.strip():
            break
        cells = line.split(None, 2)
        if line[0] != " " and len(cells) == 3:
            rows.append((cells[0], cells[1], cells[2]))
    return rows


@pytest.mark.docker
def test_pull_present_and_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    engine = docker_stack().docker_host
    assert main(["pull", "--docker-host", engine, PRESENT_IMAGE, MISSING_IMAGE]) == 1
    out, err = capsys.readouterr()
    rows = table(out)
    assert [(image, host) for image, host, _ in rows] == [(PRESENT_IMAGE, engine), (MISSING_IMAGE, engine)]
    assert rows[0][2] == PRESENT
    assert rows[1][2].startswith("failed: ")
    assert "1 of 2 image(s)" in out
    assert f"pulling {MISSING_IMAGE}" in err


@pytest.mark.docker
def test_pull_what_the_config_names_on_its_engines(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    stack = docker_stack()
    path = tmp_path / "jupyterhub_config.py"
    second: dict[str, Any] = {"name": "two", "url": stack.docker_host_2}
    if stack.docker_host_2_tls:  # a remote machine's engine: TCP with mutual TLS
        second.update(url=stack.docker_host_2_tls, tls=dict(stack.tls_2))
    hosts = [{"name": "one", "url": stack.docker_host}, second]
    path.write_text(
        f"c.DoLabSpawner.docker_hosts = {hosts!r}\n"
        f"c.DoLabSpawner.profile_list = [{docker_profile(PRESENT_IMAGE, env={'alt': 'dolab-singleuser-test:alt'})!r}]\n"
    )
    assert main(["pull", "--config", str(path)]) == 0
    rows = table(capsys.readouterr().out)
    assert rows == [
        (PRESENT_IMAGE, "one", PRESENT),
        ("dolab-singleuser-test:alt", "one", PRESENT),
        (PRESENT_IMAGE, "two", PRESENT),
        ("dolab-singleuser-test:alt", "two", PRESENT),
    ]


@pytest.mark.docker
def test_pull_finds_the_config_in_the_current_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = docker_stack().docker_host
    (tmp_path / "jupyterhub_config.py").write_text(f"c.DockerBackend.image = {MISSING_IMAGE!r}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["pull", "--docker-host", engine]) == 1
    assert [(image, result.split(":")[0]) for image, _, result in table(capsys.readouterr().out)] == [
        (MISSING_IMAGE, "failed")
    ]


def test_pull_on_an_engine_that_is_down(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["pull", "--docker-host", f"unix://{tmp_path}/no.sock", PRESENT_IMAGE]) == 1
    rows = table(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0][2].startswith("failed: the engine is not answering (no docker socket")
