"""``dolab pull``: pull images onto every Docker engine ahead of time, so that no spawn waits for a pull.

The images come from the command line, or else from the hub's config (:func:`configured_images`); the engines
from the config's ``DoLabSpawner.docker_hosts``, or ``--docker-host URL``. An image already on an engine is left as
it is (the docker backend pulls only what is missing). Progress goes to stderr, throttled; the result table to
stdout, with one row per image and engine: pulled, already present, or failed with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from dolab_core.gpus import LOCAL_HOST
from dolab_core.hubconfig import config_value

from .common import CliError, _short, format_table, run_with_timeout
from .doctor import _config_dir, _docker_reason

__all__ = [
    "PRESENT",
    "PULLED",
    "PullRow",
    "configured_engines",
    "configured_images",
    "load_hub_config",
    "pull_on_engine",
]

PULLED, PRESENT = "pulled", "already present"
PULL_HEADERS = ("image", "engine", "result")
PROGRESS_EVERY_SECONDS = 2.0


@dataclass(frozen=True)
class PullRow:
    """One line of the table: an image on an engine, and what became of it (``failed: reason`` when it failed)."""

    image: str
    engine: str
    result: str

    @property
    def ok(self) -> bool:
        """Whether the image is on the engine now."""
        return self.result in (PULLED, PRESENT)


def _image_of(override: Any) -> str:
    image = override.get("image") if isinstance(override, Mapping) else None
    return image.strip() if isinstance(image, str) else ""


def configured_images(config: Any, default_image: str = "") -> list[str]:
    """Every image the hub config names, in order, once each.

    ``c.DockerSpawner.image``, ``c.DockerBackend.image``, and the ``image`` of every ``spawner_override`` in
    ``c.DoLabSpawner.profile_list`` (a list; a callable cannot be read) and its ``profile_options`` choices. When a
    docker profile can start without any of these naming its image, the image it then gets is added too: the two
    traits' value, else ``default_image`` (DockerSpawner's own default).
    """
    images: list[str] = []

    def add(image: str) -> None:
        if image and image not in images:
            images.append(image)

    fallback = ""
    for section in ("DockerSpawner", "DockerBackend"):
        value = config_value(config, section, "image")
        if isinstance(value, str) and value.strip():
            add(value.strip())
            fallback = value.strip()  # DockerBackend's wins: it is the subclass
    profiles = config_value(config, "DoLabSpawner", "profile_list", [])
    needs_fallback = False
    for profile in profiles if isinstance(profiles, (list, tuple)) else []:
        if not isinstance(profile, Mapping):
            continue
        add(_image_of(profile.get("spawner_override")))
        options = profile.get("profile_options")
        options = [o for o in options.values() if isinstance(o, Mapping)] if isinstance(options, Mapping) else []
        # A start lacks an image when neither the profile nor any chosen choice names one.
        every_option_has_imageless_choice = True
        for option in options:
            choices = option.get("choices")
            choices = [c for c in choices.values() if isinstance(c, Mapping)] if isinstance(choices, Mapping) else []
            for choice in choices:
                add(_image_of(choice.get("spawner_override")))
            if choices and all(_image_of(c.get("spawner_override")) for c in choices):
                every_option_has_imageless_choice = False
        if profile.get("backend") == "docker" and not _image_of(profile.get("spawner_override")):
            needs_fallback = needs_fallback or every_option_has_imageless_choice
    if needs_fallback:
        add(fallback or default_image)
    return images


def configured_engines(config: Any) -> list[dict[str, Any]]:
    """``c.DoLabSpawner.docker_hosts`` validated (default: the local engine); CliError with a sentence."""
    from dolab_core.engines.docker import check_docker_hosts

    try:
        return check_docker_hosts(config_value(config, "DoLabSpawner", "docker_hosts", [{"name": LOCAL_HOST}]))
    except ValueError as e:
        raise CliError(f"c.DoLabSpawner.docker_hosts in the hub config is not usable: {e}") from None


def load_hub_config(path: Path) -> Any:
    """The traitlets Config that ``path`` (a ``jupyterhub_config.py``) builds, with its overlays.

    The file runs as the hub would run it (its own output is not shown); CliError when it fails or exits.
    """
    from traitlets.config.loader import PyFileConfigLoader

    if not path.is_file():
        raise CliError(f"No hub config at {path}: pass --config with the hub's jupyterhub_config.py.")
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            return PyFileConfigLoader(path.name, path=str(path.parent)).load_config()
    except SystemExit as e:
        raise CliError(f"{path} refused to load: {e.code}") from None
    except Exception as e:
        raise CliError(f"{path} failed to load ({type(e).__name__}: {_short(e)}); `jupyterhub -f` shows why.") from None


def _failure(error: BaseException) -> str:
    """``failed: reason`` for a pull: the engine's own explanation, with the two causes everyone meets named."""
    text = _short(getattr(error, "explanation", None) or error, 200)
    lowered = text.lower()
    if "no such host" in lowered or "dial tcp" in lowered or "i/o timeout" in lowered:
        return f"failed: no registry reachable from the engine ({text})"
    if "pull access denied" in lowered or "not found" in lowered or "manifest unknown" in lowered:
        return f"failed: no such image in the registry, or it needs `docker login` ({text})"
    return f"failed: {text}"


def pull_on_engine(
    host: Mapping[str, Any],
    images: Sequence[str],
    timeout_seconds: float,
    progress: Callable[[str], None],
) -> list[PullRow]:
    """Each image on one engine: left alone when present, else pulled with throttled progress lines."""
    from dolab_core.engines.docker import engines

    engine = str(host["name"])
    try:
        api = run_with_timeout(lambda: engines.client(dict(host), 30), 35)
    except Exception as e:
        return [
            PullRow(image, engine, f"failed: the engine is not answering ({_docker_reason(e)})") for image in images
        ]
    rows = []
    for image in images:
        try:
            run_with_timeout(partial(api.inspect_image, image), 35)
            rows.append(PullRow(image, engine, PRESENT))
            continue
        except Exception as e:
            if getattr(e, "status_code", None) != 404:
                rows.append(PullRow(image, engine, f"failed: {_short(e)}"))
                continue
        progress(f"{engine}: pulling {image}")
        last = 0.0
        try:
            puller = engines.client(dict(host), timeout_seconds, purpose="pull")
            for line in puller.pull(image, stream=True, decode=True):
                if line.get("error"):
                    raise RuntimeError(line["error"])
                if time.monotonic() - last >= PROGRESS_EVERY_SECONDS and line.get("status"):
                    last = time.monotonic()
                    detail = " ".join(str(line[k]) for k in ("id", "progress") if line.get(k))
                    progress(f"{engine}: {image}: {line['status']}{' ' + detail if detail else ''}")
            run_with_timeout(partial(api.inspect_image, image), 35)
        except Exception as e:
            rows.append(PullRow(image, engine, _failure(e)))
            continue
        rows.append(PullRow(image, engine, PULLED))
    return rows


def _default_config() -> Path:
    return _config_dir() / "jupyterhub_config.py"


def _docker_default_image() -> str:
    from dockerspawner import DockerSpawner

    return str(DockerSpawner.class_traits()["image"].default_value)


def _pull(args: argparse.Namespace) -> int:
    config_path = Path(args.config) if args.config else _default_config()
    # The config is read only for what the command line does not give: the images, the engines.
    config = load_hub_config(config_path) if not args.images or not args.docker_host else None
    images = list(dict.fromkeys(args.images)) or configured_images(config, _docker_default_image())
    if not images:
        raise CliError(
            f"{config_path} names no Docker image (no docker profile in a profile_list list, no DockerSpawner.image):"
            " name the images to pull."
        )
    hosts = [{"name": args.docker_host, "url": args.docker_host}] if args.docker_host else configured_engines(config)
    rows: list[PullRow] = []
    for host in hosts:
        rows.extend(pull_on_engine(host, images, args.timeout, lambda line: print(line, file=sys.stderr, flush=True)))
    wrap_at = max(40, shutil.get_terminal_size((160, 24)).columns - 70)
    print(format_table(PULL_HEADERS, [(r.image, r.engine, r.result) for r in rows], wrap_at=wrap_at))
    good = sum(r.ok for r in rows)
    print(f"\n{good} of {len(rows)} image(s) on their engine{'s' if len(hosts) > 1 else ''}.")
    return 0 if good == len(rows) else 1
