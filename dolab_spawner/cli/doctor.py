"""``dolab doctor``: what this machine has for a hub.

Each check is a small function returning a :class:`CheckRow`, so tests call them one at a time; every one that
can block runs under a timeout. :func:`doctor_rows` runs them all, turning a crashing check into a row, and
:func:`doctor_exit_code` says whether the embedded default (SQLite, local backend) can run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dolab_core.gpus import GpuSlot, read_nvml_inventory
from dolab_core.hubconfig import env_list, find_proxy
from dolab_core.paths import default_data_dir

from .common import (
    _http_reason,
    _scrub,
    _short,
    default_hub_url,
    format_table,
    mask_url,
    run_with_timeout,
    static_inventory,
)

__all__ = [
    "MISSING",
    "OK",
    "WARNING",
    "CheckRow",
    "check_database",
    "check_docker",
    "check_gpus",
    "check_hub",
    "check_proxy",
    "check_runpod",
    "check_singleuser",
    "doctor_exit_code",
    "doctor_rows",
    "read_nvml",
]

OK, MISSING, WARNING = "ok", "missing", "warning"
DOCTOR_HEADERS = ("part", "status", "found", "what to do")


@dataclass(frozen=True)
class CheckRow:
    """One line of ``dolab doctor``: a part, its status (ok / missing / warning), what was found, what to do.

    ``required``: the embedded default (SQLite, local backend) cannot run without this part.
    """

    part: str
    status: str
    found: str
    todo: str = ""
    required: bool = False


def read_nvml() -> tuple[str, list[GpuSlot]]:
    """The NVIDIA driver version and the GPUs, through NVML; RuntimeError with NVML's reason without them."""
    try:
        import pynvml
    except ImportError:
        raise RuntimeError("nvidia-ml-py is not installed") from None
    try:
        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            slots = read_nvml_inventory()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:
        raise RuntimeError(f"NVML: {e}") from None
    return (driver.decode() if isinstance(driver, bytes) else str(driver)), slots


def _describe(slots: Sequence[GpuSlot]) -> str:
    return "; ".join(f"{s.index}: {s.name} ({s.memory_gb:g} GB)" for s in slots) or "no GPUs"


def check_gpus(
    env: Mapping[str, str],
    read: Callable[[], tuple[str, list[GpuSlot]]] = read_nvml,
    timeout_seconds: float = 10,
) -> CheckRow:
    """NVML, the driver and each GPU; or the static ``DOLAB_GPU_INVENTORY`` the hub would use instead."""
    part = "NVML and GPUs"
    try:
        driver, gpus = run_with_timeout(read, timeout_seconds)
        nvml_text = f"driver {driver}; {_describe(gpus)}"
    except (RuntimeError, TimeoutError) as e:
        driver, gpus = "", []
        nvml_text = f"no NVIDIA driver ({_short(e)})"
    gpu_ids = env_list(env, "DOLAB_GPU_IDS")
    ids_text = f"; DOLAB_GPU_IDS keeps {', '.join(gpu_ids)}" if gpu_ids else ""
    try:
        static = static_inventory(env)
    except ValueError as e:
        return CheckRow(part, WARNING, str(e), "Fix DOLAB_GPU_INVENTORY: the hub refuses to start with it")
    if static is not None:
        return CheckRow(
            part,
            OK,
            f"DOLAB_GPU_INVENTORY: {_describe(static)}{ids_text} (NVML: {nvml_text})",
            "Nothing: the hub uses this static inventory instead of NVML",
        )
    if not driver:
        return CheckRow(
            part,
            MISSING,
            nvml_text,
            "GPU profiles need the NVIDIA driver; on a CPU-only box nothing to do "
            "(or set DOLAB_GPU_INVENTORY for tests)",
        )
    if not gpus:
        return CheckRow(part, WARNING, nvml_text, "No GPU profiles will be offered; see what `nvidia-smi` says")
    return CheckRow(part, OK, nvml_text + ids_text)


def _docker_version(timeout_seconds: float) -> dict[str, Any]:
    import docker

    client = docker.from_env(timeout=timeout_seconds)
    try:
        return client.version()
    finally:
        client.close()


def _docker_reason(error: BaseException) -> str:
    """The cause docker-py buries in its message, for the two everyone meets."""
    text = str(error)
    if "No such file or directory" in text:
        return "no docker socket: is dockerd running?"
    if "Permission denied" in text:
        return "permission denied on the docker socket: add the hub's user to the docker group"
    return _short(error)


def check_docker(
    version: Callable[[float], Mapping[str, Any]] = _docker_version, timeout_seconds: float = 5
) -> CheckRow:
    """The docker engine's version, asked with an SDK timeout and a thread timeout around it."""
    part, todo = "Docker engine", "Install docker.io and start dockerd to use docker profiles"
    try:
        info = run_with_timeout(lambda: version(timeout_seconds), timeout_seconds + 1)
    except ImportError:
        return CheckRow(part, MISSING, "the docker Python package is not installed", "pip install docker")
    except TimeoutError:
        return CheckRow(part, MISSING, f"the docker engine did not answer in {timeout_seconds:g} s", todo)
    except Exception as e:
        return CheckRow(part, MISSING, f"no docker engine ({_docker_reason(e)})", todo)
    return CheckRow(part, OK, f"engine {info.get('Version', '?')} (API {info.get('ApiVersion', '?')})")


def check_proxy(env: Mapping[str, str], config_dir: str | os.PathLike[str], timeout_seconds: float = 5) -> CheckRow:
    """The configurable-http-proxy the shipped config would run: it exists, runs, and answers ``--version``."""
    part, todo = "Proxy", "Run `make run` (installs it) or `npm install -g configurable-http-proxy@5`"
    command = find_proxy(env, config_dir)[0]
    path = command if os.sep in command else shutil.which(command)
    if not path or not os.path.exists(path):
        return CheckRow(part, MISSING, f"{command} not found", todo, required=True)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        return CheckRow(part, MISSING, f"{path} is not an executable file", todo, required=True)
    try:
        # Its own process group: a script that forks must not keep our pipes open after the kill.
        proc = subprocess.Popen(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    except OSError as e:
        return CheckRow(part, MISSING, f"{path} cannot run ({e.strerror})", todo, required=True)
    try:
        out, err = proc.communicate(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return CheckRow(
            part,
            WARNING,
            f"{path} did not answer --version in {timeout_seconds:g} s",
            f"Check that node works: run `{path} --version`",
            required=True,
        )
    if proc.returncode != 0:
        why = _short(err or out or "no output")
        return CheckRow(part, MISSING, f"{path} --version failed (exit {proc.returncode}: {why})", todo, required=True)
    version = out.strip().splitlines()[0] if out.strip() else "?"
    return CheckRow(part, OK, f"{path} (version {version})", required=True)


def _sqlite_file(url: str) -> str | None:
    """The file of a ``sqlite:///path`` URL; None for other databases and for in-memory SQLite."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] != "sqlite" or not rest.startswith("/"):
        return None
    path = rest[1:].split("?")[0]
    return path if path and path != ":memory:" else None


def _can_create(directory: str) -> bool:
    """Whether the hub's user could create a file in ``directory`` (making the missing folders first)."""
    path = Path(directory).absolute()
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _table_names(url: str) -> set[str]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            return set(sqlalchemy.inspect(connection).get_table_names())
    finally:
        engine.dispose()


def check_database(env: Mapping[str, str], data_dir: str, timeout_seconds: float = 10) -> CheckRow:
    """``DOLAB_DB_URL`` or the default SQLite file: can the hub use it, and does it hold the hub's tables yet?

    A SQLite file that does not exist yet is not created here (the hub does that); its folder is checked.
    """
    part = "Database"
    url = env.get("DOLAB_DB_URL") or f"sqlite:///{Path(data_dir) / 'jupyterhub.sqlite'}"
    shown = mask_url(url)
    todo = (
        "Fix DOLAB_DB_URL, or unset it for the embedded SQLite default"
        if env.get("DOLAB_DB_URL")
        else f"Make {data_dir} writable by the hub's user (or set DOLAB_DATA_DIR)"
    )
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None and not os.path.exists(sqlite_file):
        folder = os.path.dirname(os.path.abspath(sqlite_file))
        if _can_create(folder):
            return CheckRow(part, OK, f"{shown}: not created yet (the hub creates it at first start)", required=True)
        return CheckRow(part, MISSING, f"{shown}: cannot create a file in {folder}", todo, required=True)
    try:
        tables = run_with_timeout(lambda: _table_names(url), timeout_seconds)
    except ImportError as e:
        return CheckRow(
            part,
            MISSING,
            f"{shown}: {_scrub(_short(e), url)}",
            "Install that database driver into the hub's environment, or name one you have in DOLAB_DB_URL "
            "(e.g. postgresql+psycopg2://)",
            required=True,
        )
    except Exception as e:
        return CheckRow(part, MISSING, f"{shown}: {_scrub(_short(e), url)}", todo, required=True)
    if {"users", "spawners"} <= tables:
        return CheckRow(part, OK, f"{shown}: connected, hub tables present", required=True)
    return CheckRow(
        part, OK, f"{shown}: connected, no hub tables yet (the hub creates them at first start)", required=True
    )


def check_runpod(env: Mapping[str, str]) -> CheckRow:
    """Whether ``RUNPOD_API_KEY`` is set (its value is never shown)."""
    if env.get("RUNPOD_API_KEY"):
        return CheckRow("RunPod", OK, "RUNPOD_API_KEY is set (value not shown)")
    return CheckRow(
        "RunPod", WARNING, "RUNPOD_API_KEY is not set", "RunPod profiles need RUNPOD_API_KEY in the hub's environment"
    )


def check_singleuser(executable: str = sys.executable, path: str | None = None) -> CheckRow:
    """``jupyterhub-singleuser`` beside ``executable`` (what the local backend runs first), else on ``path``."""
    part = "Single-user server"
    beside = Path(executable).parent / "jupyterhub-singleuser"
    if beside.is_file() and os.access(beside, os.X_OK):
        return CheckRow(part, OK, str(beside), required=True)
    found = shutil.which("jupyterhub-singleuser", path=path)
    if found:
        return CheckRow(part, OK, f"{found} (on PATH)", required=True)
    return CheckRow(
        part,
        MISSING,
        f"jupyterhub-singleuser is neither beside {executable} nor on PATH",
        "Install jupyterhub and jupyterlab into the hub's Python environment (`pip install jupyterhub jupyterlab`)",
        required=True,
    )


def check_hub(url: str, timeout_seconds: float = 3) -> CheckRow:
    """Whether a JupyterHub answers ``GET {url}/hub/api`` (which needs no token)."""
    import requests

    part = "Hub"
    todo = "Start the hub (`make run`), or set DOLAB_HUB_URL to where it listens"
    api = f"{url.rstrip('/')}/hub/api"
    try:
        response = requests.get(api, timeout=timeout_seconds)
    except requests.Timeout:
        return CheckRow(part, WARNING, f"no hub answers at {url} (no answer in {timeout_seconds:g} s)", todo)
    except requests.RequestException as e:
        return CheckRow(part, WARNING, f"no hub answers at {url} ({_http_reason(e)})", todo)
    try:
        version = response.json().get("version") if response.status_code == 200 else None
    except (ValueError, AttributeError):
        version = None
    if version:
        return CheckRow(part, OK, f"JupyterHub {version} answers at {url}")
    return CheckRow(part, WARNING, f"{api} answered HTTP {response.status_code}, not a JupyterHub API", todo)


def _config_dir() -> Path:
    """Where ``jupyterhub_config.py`` lives: the current folder when it has one, else this checkout's root."""
    cwd = Path.cwd()
    if (cwd / "jupyterhub_config.py").exists():
        return cwd
    checkout = Path(__file__).resolve().parents[2]  # dolab_spawner/cli/doctor.py -> the checkout
    return checkout if (checkout / "jupyterhub_config.py").exists() else cwd


def doctor_rows(
    env: Mapping[str, str], data_dir: str, config_dir: str | os.PathLike[str], hub_url: str
) -> list[CheckRow]:
    """Every check, in table order; a check that fails unexpectedly becomes a row, not a traceback."""
    checks: list[tuple[str, bool, Callable[[], CheckRow]]] = [
        ("NVML and GPUs", False, lambda: check_gpus(env)),
        ("Docker engine", False, check_docker),
        ("Proxy", True, lambda: check_proxy(env, config_dir)),
        ("Database", True, lambda: check_database(env, data_dir)),
        ("RunPod", False, lambda: check_runpod(env)),
        ("Single-user server", True, check_singleuser),
        ("Hub", False, lambda: check_hub(hub_url)),
    ]
    rows = []
    for part, required, check in checks:
        try:
            rows.append(check())
        except Exception as e:
            rows.append(CheckRow(part, WARNING, f"the check failed: {_short(e)}", "Report this DO-LAB bug", required))
    return rows


def doctor_exit_code(rows: Iterable[CheckRow]) -> int:
    """0 when every part the embedded default needs is ok, else 1."""
    return 0 if all(row.status == OK for row in rows if row.required) else 1


def _doctor(args: argparse.Namespace) -> int:
    env = os.environ
    hub_url = args.url or default_hub_url(env)
    rows = doctor_rows(env, default_data_dir(), _config_dir(), hub_url)
    # The two free-text columns share what the terminal has left after part and status.
    wrap_at = max(30, (shutil.get_terminal_size((160, 24)).columns - 35) // 2)
    print(format_table(DOCTOR_HEADERS, [(r.part, r.status, r.found, r.todo or "-") for r in rows], wrap_at=wrap_at))
    code = doctor_exit_code(rows)
    if code == 0:
        print("\nThe embedded default has what it needs (proxy, database, single-user server).")
    else:
        missing = ", ".join(r.part for r in rows if r.required and r.status != OK)
        print(f"\nThe embedded default cannot run yet: see {missing} above.")
    return code
