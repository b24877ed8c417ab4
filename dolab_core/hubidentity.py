"""The hub's identity: a short id that every container and pod the hub makes carries, so its reapers touch only
their own.

Two hubs may share a Docker engine or a RunPod account, and an admin may make a container labelled
``dolab.managed=true`` or a pod named ``dolab-finetune`` by hand. So each hub has an id of its own (8 lowercase hex
digits), made once and kept in the data directory (``<data dir>/hub-id``, beside the hub database and cookie
secret): it survives restarts and upgrades, and whatever backs the data directory up keeps it with the database
whose servers it names. ``$DOLAB_HUB_ID`` sets it instead (a hub whose data directory is not kept, or a reaper run
on another machine). The hub's backends read it when they name and label what they create; the reaper services get
it in their environment from the hub's config (``DOLAB_HUB_ID``).

Why not derive it from the cookie secret or the database URL: rotating the secret or moving the database (SQLite to
PostgreSQL) is routine and must not turn every running server's container into a stranger; and a name made from a
secret would publish a hash of it on every engine. A lost id fails safe: the new one matches nothing the old hub
made, so those are never reaped (their servers still find them by the ids in their state).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from .paths import default_data_dir

__all__ = ["HUB_ID_ENV", "HUB_ID_FILE", "check_hub_id", "hub_id"]

#: The environment variable that sets the hub's id (and carries it to the reaper services).
HUB_ID_ENV = "DOLAB_HUB_ID"
#: The file in the data directory that keeps it.
HUB_ID_FILE = "hub-id"

_VALID = re.compile(r"[a-z0-9]{4,16}")
_known: dict[str, str] = {}  # path -> id: read once per process, the file never changes


def check_hub_id(value: str, where: str = HUB_ID_ENV) -> str:
    """``value`` when it is a valid hub id (4 to 16 lowercase letters and digits), else ValueError with a sentence."""
    if not isinstance(value, str) or not _VALID.fullmatch(value):
        raise ValueError(
            f"{where} must be 4 to 16 lowercase letters and digits (it goes into container and pod names), "
            f"not {value!r}"
        )
    return value


def hub_id(env: Mapping[str, str] | None = None, data_dir: str | None = None, create: bool = True) -> str:
    """This hub's id: ``$DOLAB_HUB_ID``, else the one kept in ``<data dir>/hub-id``, made there now when missing
    (unless ``create`` is False). Raises ValueError with a sentence for a bad or missing id."""
    env = os.environ if env is None else env
    if env.get(HUB_ID_ENV):
        return check_hub_id(env[HUB_ID_ENV])
    path = Path(data_dir or env.get("DOLAB_DATA_DIR") or default_data_dir()) / HUB_ID_FILE
    key = str(path)
    if key not in _known:
        _known[key] = _read_or_make(path, create)
    return _known[key]


def _read_or_make(path: Path, create: bool) -> str:
    try:
        return check_hub_id(path.read_text().strip(), where=str(path))
    except FileNotFoundError:
        if not create:
            raise ValueError(
                f"This hub has no id yet ({path} is missing): set {HUB_ID_ENV}, or start the hub once first"
            ) from None
    except OSError as e:
        raise ValueError(f"Cannot read the hub's id from {path}: {e.strerror or e}") from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    temporary.write_text(secrets.token_hex(4) + "\n")
    try:
        # link() fails when the file exists: of two processes making it at once, both keep the first one's id.
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    return check_hub_id(path.read_text().strip(), where=str(path))
