"""Small helpers behind the shipped ``jupyterhub_config.py``: secrets on disk, env parsing, the proxy.

Each is a pure function of its inputs (paths, an environment mapping), so the config stays a readable list of
settings and the helpers get the tests.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shlex
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigEnvError",
    "config_value",
    "ensure_secret",
    "env_float",
    "env_json",
    "env_list",
    "find_proxy",
    "generate_password",
]


class ConfigEnvError(ValueError):
    """An environment variable has a value the config cannot use; the message names it."""


def generate_password(length: int = 16) -> str:
    """A password that is easy to type: letters and digits only."""
    alphabet = "abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "".join(secrets.choice(alphabet) for _ in range(length))


def ensure_secret(path: str | os.PathLike[str], length: int = 16) -> tuple[str, bool]:
    """Read the secret at ``path``, or create it (mode 0600) on the first run.

    Returns ``(secret, created)`` so the caller can print a new secret once, and only once.
    """
    path = Path(path)
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value, False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = generate_password(length)
    # Written beside, then renamed: a crash can never leave an empty secret in place.
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(partial, path)
    return value, True


def env_json(env: Mapping[str, str], name: str, default: Any = None) -> Any:
    """A JSON value from ``env[name]`` (or the file named by ``env[name + '_FILE']``)."""
    text = env.get(name)
    file_name = env.get(f"{name}_FILE")
    if not text and file_name:
        try:
            text = Path(file_name).read_text()
        except OSError as e:
            raise ConfigEnvError(f"{name}_FILE={file_name}: cannot read it ({e.strerror})") from None
    if not text:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigEnvError(f"{name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def env_list(env: Mapping[str, str], name: str, default: list[str] | None = None) -> list[str]:
    """A comma-separated list from ``env[name]``, blanks dropped."""
    text = env.get(name)
    if text is None:
        return list(default or [])
    return [item.strip() for item in text.split(",") if item.strip()]


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    """A finite number from ``env[name]`` (``default`` when unset or empty)."""
    text = env.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigEnvError(f"{name} must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise ConfigEnvError(f"{name} must be a finite number, not {text!r}")
    return value


def config_value(config: Any, section: str, key: str, default: Any = None) -> Any:
    """``c.<section>.<key>`` as the config sets it so far, without creating it: a ``LazyConfigValue`` (``.append``
    in a config) is applied to ``default``; unset gives ``default``. Services' registrations read the hub's config
    with it."""
    from traitlets.config import LazyConfigValue

    if section not in config or key not in config[section]:
        return default
    value = config[section][key]
    return value.get_value(default) if isinstance(value, LazyConfigValue) else value


def find_proxy(env: Mapping[str, str], config_dir: str | os.PathLike[str]) -> list[str]:
    """The configurable-http-proxy command: ``$DOLAB_PROXY_COMMAND``, the one ``make run`` installed
    (npm's under ``.dolab/node``, else PyPI's beside this Python), else whatever is on PATH.
    """
    if env.get("DOLAB_PROXY_COMMAND"):
        return shlex.split(env["DOLAB_PROXY_COMMAND"])
    candidates = [
        Path(config_dir) / ".dolab" / "node" / "node_modules" / ".bin" / "configurable-http-proxy",
        Path(sys.executable).parent / "configurable-http-proxy",
    ]
    for candidate in candidates:
        if candidate.exists():
            return [str(candidate)]
    found = shutil.which("configurable-http-proxy", path=env.get("PATH"))
    return [found or "configurable-http-proxy"]
