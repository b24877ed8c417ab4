"""The package rules of docs/architecture.md, checked on every import statement (function-level ones too).

dolab_core is shared and imports none of DO-LAB's other packages; dolab_lab (what runs in users' servers)
imports only the core; the spawner never imports the services, the services never import the spawner.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dolab_core", "dolab_lab", "dolab_spawner", "dolab_services")

#: package -> the DO-LAB packages it may import (besides itself)
ALLOWED = {
    "dolab_core": set(),
    "dolab_lab": {"dolab_core"},
    "dolab_spawner": {"dolab_core", "dolab_lab"},
    "dolab_services": {"dolab_core"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    if path.name == "__init__.py":
        package = path.relative_to(ROOT).parts[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def violations() -> list[str]:
    broken = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in imported_modules(path):
                top = module.split(".")[0]
                if top in PACKAGES and top != package and top not in ALLOWED[package]:
                    broken.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return broken


def test_no_package_imports_across_the_rules() -> None:
    assert violations() == []


def test_the_check_sees_a_broken_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule check itself: a services module importing the spawner, relatively from two levels down, is found."""
    root = tmp_path
    for package in PACKAGES:
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
    (root / "dolab_services" / "culler").mkdir()
    (root / "dolab_services" / "culler" / "bad.py").write_text("def f():\n    from ...dolab_spawner import plans\n")
    (root / "dolab_core" / "bad.py").write_text("import dolab_services.web\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", root)
    assert violations() == [
        "dolab_core/bad.py:1 imports dolab_services.web",
        "dolab_services/culler/bad.py:2 imports dolab_spawner",
    ]


@pytest.mark.parametrize("service", ["culler", "monitor", "sync"])
def test_a_service_starts_without_the_spawner_or_docker(service: str) -> None:
    """``python -X importtime -m dolab_services.<service> --help`` loads neither JupyterHub's spawner nor docker-py,
    paramiko or the RunPod SDK."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", f"dolab_services.{service}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "dolab_services" in loaded  # the check reads the right output
    heavy = {"jupyterhub.spawner", "dockerspawner", "docker", "paramiko", "runpod", "dolab_spawner"}
    assert loaded & heavy == set()
