"""Where DO-LAB keeps its files on the hub's machine."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["default_data_dir", "protect_data_dir"]


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


def protect_data_dir(data_dir: str | os.PathLike[str], workspace_root: str | os.PathLike[str]) -> None:
    """Share the machine safely with users' own accounts (a root hub whose local servers run as system users).

    Each server must reach its own workspace, which by default lies inside the data directory, and nothing else
    there. So the folders from the data directory down to the workspace root become traverse-only for others
    (0711: no listing), every other entry of the data directory loses its group and other permissions (the
    passwords, tokens, SQLite databases, logs), a workspace root elsewhere is made 0711 when it is new, and this
    process's umask becomes 077, so that what the hub and
    its services create later is private too. Servers set their own umask (the local backend's).
    """
    data = Path(data_dir).resolve()
    workspaces = Path(workspace_root).resolve()
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    inside = workspaces != data and data in workspaces.parents
    passage = [data, *[p for p in reversed(workspaces.parents) if data in p.parents]] if inside else []
    for folder in passage:
        folder.mkdir(exist_ok=True, mode=0o711)
        folder.chmod(0o711)
    if not inside:
        _private(data)
    if inside:
        workspaces.mkdir(exist_ok=True, mode=0o711)
        workspaces.chmod(0o711)  # users reach their own folder, and never list the others'
    elif not workspaces.exists():
        workspaces.mkdir(parents=True, mode=0o711)  # an admin's existing folder keeps the modes they gave it
        workspaces.chmod(0o711)
    passed = {data, *passage, workspaces}
    for folder in passage:
        for entry in os.scandir(folder):
            path = Path(entry.path)
            if path not in passed and not entry.is_symlink():
                _private(path)
    os.umask(0o077)


def _private(path: Path) -> None:
    mode = stat.S_IMODE(path.lstat().st_mode)
    if mode & 0o077:
        path.chmod(mode & 0o700)
