"""The culler's JupyterLab notice on users' servers, without rebuilding their images.

The notice is a prebuilt (federated) JupyterLab extension (source in ``labextension/``, built by ``make
labextension`` into ``share/labextensions/dolab-culler-notice``). JupyterLab loads every prebuilt extension it
finds under ``labextensions/`` of a Jupyter data directory, so the backends only have to put that directory where
the server looks:

- local processes get ``share/`` appended to ``JUPYTER_PATH`` (after any the admin set, which keep precedence);
- containers on this machine's Docker engine get the extension bind-mounted read-only at
  :data:`CONTAINER_DIR`, a system data directory every Jupyter install searches, so no variable of the image is
  changed. Engines on other machines cannot see this machine's files: their containers go without it.

``lab_notice`` (:class:`LabNoticeTraits`, on ``DoLabSpawner`` and every backend; per profile through
``spawner_override``) turns it off. When the extension was not built, servers start as before and the hub's log
says once how to build it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from traitlets import Bool, HasTraits

__all__ = [
    "CONTAINER_DIR",
    "NOTICE_NAME",
    "SHARE_DIR",
    "LabNoticeTraits",
    "built_notice",
    "with_jupyter_path",
]

#: The extension's name (its folder under ``labextensions/``).
NOTICE_NAME = "dolab-culler-notice"
#: The Jupyter data directory the build fills (``labextensions/dolab-culler-notice`` inside).
SHARE_DIR = Path(__file__).resolve().parent / "share"
#: Where containers see the extension: under ``/usr/local/share/jupyter``, on every Jupyter's search path.
CONTAINER_DIR = f"/usr/local/share/jupyter/labextensions/{NOTICE_NAME}"

_missing_reported: set[Path] = set()


class LabNoticeTraits(HasTraits):
    """The switch for the culler's JupyterLab notice; mixed into DoLabSpawner and its backends."""

    lab_notice = Bool(
        True,
        config=True,
        help="""Show the culler's warnings (a coming idle or deadline stop) inside JupyterLab, with an Extend
        button, by loading DO-LAB's prebuilt extension into the server (local processes: JUPYTER_PATH; containers
        on this machine's engine: a read-only mount). Nothing in the image changes. Off: users see warnings on the
        culler's page only. Per profile: ``spawner_override: {"lab_notice": False}``.
        """,
    )


def built_notice(share_dir: Path | None = None, log: logging.Logger | None = None) -> Path | None:
    """``share_dir`` (default :data:`SHARE_DIR`) when the extension is built in it; else None, and the first time,
    a warning on ``log`` saying how to build it."""
    share_dir = share_dir or SHARE_DIR
    if (share_dir / "labextensions" / NOTICE_NAME / "package.json").is_file():
        return share_dir
    if share_dir not in _missing_reported:
        _missing_reported.add(share_dir)
        (log or logging.getLogger(__name__)).warning(
            "The culler's JupyterLab notice is not built (no %s), so servers start without it and users see "
            "warnings on the culler's page only. Build it with `make labextension` (needs npm) in the DO-LAB "
            "checkout; servers started after that get it.",
            share_dir / "labextensions" / NOTICE_NAME,
        )
    return None


def with_jupyter_path(current: str, entry: str) -> str:
    """``JUPYTER_PATH`` with ``entry`` last (earlier entries win, so an admin's own stay first); unchanged when
    it is already there."""
    parts = [p for p in current.split(os.pathsep) if p]
    if entry in parts:
        return os.pathsep.join(parts)
    return os.pathsep.join([*parts, entry])
