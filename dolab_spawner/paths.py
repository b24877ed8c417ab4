"""Where DO-LAB keeps its files on the hub's machine."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_data_dir"]


def default_data_dir() -> str:
    """``$DOLAB_DATA_DIR``, else ``/srv/dolab`` for root, else ``~/.local/share/dolab``.

    It holds the hub database, cookie secret, generated passwords and tokens, workspaces and server logs.
    """
    configured = os.environ.get("DOLAB_DATA_DIR")
    if configured:
        return os.path.abspath(configured)
    if os.geteuid() == 0:
        return "/srv/dolab"
    return str(Path.home() / ".local" / "share" / "dolab")
