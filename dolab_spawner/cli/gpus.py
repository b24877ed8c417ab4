"""``dolab gpus``: which server holds which GPU, from the hub's REST API.

:func:`slot_rows` is pure (user models and an inventory in, table rows out); :func:`fetch_active_users` and
:func:`local_inventory` fetch its inputs under timeouts, and every failure is a :class:`~.common.CliError`
sentence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dolab_core.gpus import GpuSlot, read_nvml_inventory, restrict
from dolab_core.hubconfig import env_list
from dolab_core.paths import default_data_dir
from dolab_core.serverstate import ServerState

from .common import CliError, _http_reason, _short, default_hub_url, format_table, run_with_timeout, static_inventory

__all__ = [
    "CLI_SCOPES",
    "SlotRow",
    "fetch_active_users",
    "find_token",
    "local_inventory",
    "slot_rows",
    "state_problem",
]

PAGINATION_MEDIA_TYPE = "application/jupyterhub-pagination+json"
#: What the shipped config grants the ``dolab-cli`` service, and so what ``dolab gpus`` needs.
CLI_SCOPES = ("list:users", "read:users:name", "read:servers", "admin:server_state")
GPU_HEADERS = ("host", "index", "name", "memory", "held by", "profile", "stop_at")


@dataclass(frozen=True)
class SlotRow:
    """One line of ``dolab gpus``: a GPU and the server holding it (``user`` empty when the GPU is free)."""

    host: str
    index: int
    uuid: str
    name: str
    memory_gb: float
    user: str = ""
    server: str = ""
    profile: str = ""
    stop_at: str = ""

    @property
    def held_by(self) -> str:
        """``user`` for a default server, ``user/server`` for a named one, ``free`` when nobody holds it."""
        if not self.user:
            return "free"
        return f"{self.user}/{self.server}" if self.server else self.user

    def cells(self) -> tuple[str, ...]:
        """The table's cells, in :data:`GPU_HEADERS` order."""
        return (
            self.host,
            str(self.index),
            self.name,
            f"{self.memory_gb:g} GB",
            self.held_by,
            self.profile or "-",
            self.stop_at or "-",
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field, plus ``held_by`` (null when free)."""
        return {**asdict(self), "held_by": self.held_by if self.user else None}


def slot_rows(users: Sequence[Mapping[str, Any]], inventory: Sequence[GpuSlot]) -> list[SlotRow]:
    """Every GPU of ``inventory`` and every GPU a server's state says it holds, with its holder.

    ``users`` are user models from ``GET /hub/api/users`` whose server models carry ``state`` (DoLabSpawner's
    ``get_state()``, read through :class:`ServerState`). A held GPU missing from the inventory (another host, a
    changed inventory) is listed too; a GPU two servers claim gets a row for each. Malformed slot entries are
    skipped.
    """
    holders: dict[str, list[tuple[GpuSlot, dict[str, str]]]] = {}
    for user in users:
        servers = user.get("servers") or {}
        for server_name in sorted(servers):
            state = ServerState.of(servers[server_name])
            holder = {
                "user": str(user.get("name", "?")),
                "server": server_name,
                "profile": state.profile,
                "stop_at": state.stop_at,
            }
            for entry in state.slots:
                try:
                    slot = GpuSlot.from_dict(entry)
                except ValueError:
                    continue
                holders.setdefault(slot.key, []).append((slot, holder))

    def row(slot: GpuSlot, holder: Mapping[str, str] | None = None) -> SlotRow:
        return SlotRow(slot.host, slot.index, slot.uuid, slot.name, slot.memory_gb, **(holder or {}))

    rows = []
    known = set()
    for slot in inventory:
        known.add(slot.key)
        held = holders.get(slot.key)
        rows.extend([row(slot, holder) for _, holder in held] if held else [row(slot)])
    for key, held in holders.items():
        if key not in known:
            rows.extend(row(slot, holder) for slot, holder in held)
    return sorted(rows, key=lambda r: (r.host, r.index, r.uuid))


def state_problem(users: Sequence[Mapping[str, Any]]) -> str | None:
    """A sentence when the user models lack what slot_rows needs (the token's scopes), else None."""
    for user in users:
        servers = user.get("servers")
        if not isinstance(servers, Mapping):
            return (
                "The token can list users but not their servers (it needs read:servers), "
                "so it cannot tell who holds which GPU."
            )
        if any(isinstance(s, Mapping) and "state" not in s for s in servers.values()):
            return (
                "The token can see servers but not their state (it needs admin:server_state), "
                "so it cannot tell who holds which GPU."
            )
    return None


def find_token(cli_token: str | None, env: Mapping[str, str], data_dir: str) -> tuple[str, str] | None:
    """``(token, where it came from)``: ``--token``, then ``$JUPYTERHUB_API_TOKEN``, then ``<data dir>/cli-token``.

    None when none is there; CliError when the file exists but cannot be read.
    """
    if cli_token and cli_token.strip():
        return cli_token.strip(), "--token"
    if env.get("JUPYTERHUB_API_TOKEN", "").strip():
        return env["JUPYTERHUB_API_TOKEN"].strip(), "JUPYTERHUB_API_TOKEN"
    path = Path(data_dir) / "cli-token"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CliError(f"Cannot read {path} ({e.strerror}): run as the hub's user or pass --token.") from None
    return (text, str(path)) if text else None


def fetch_active_users(hub_url: str, token: str, timeout_seconds: float = 10, session: Any = None) -> list[dict]:
    """Every user with an active server, from ``GET /hub/api/users?state=active``, all pages.

    Pages are followed with ``_pagination.next``'s offset and limit on ``hub_url`` rather than its ``url``,
    which the hub builds from the request's Host and may not reach us through a proxy (and the token must
    not go to another host). Raises CliError with a sentence for every failure.
    """
    import requests

    http = session or requests.Session()
    base = hub_url.rstrip("/")
    api = f"{base}/hub/api/users"
    headers = {"Authorization": f"token {token}", "Accept": PAGINATION_MEDIA_TYPE}
    params: dict[str, Any] = {"state": "active"}
    users: list[dict] = []
    while True:
        try:
            response = http.get(api, params=params, headers=headers, timeout=timeout_seconds)
        except requests.Timeout:
            raise CliError(f"The hub at {base} did not answer in {timeout_seconds:g} s.") from None
        except requests.RequestException as e:
            raise CliError(
                f"No hub answers at {base} ({_http_reason(e)}): start it, or pass --url / set DOLAB_HUB_URL."
            ) from None
        if response.status_code in (401, 403):
            raise CliError(
                f"The hub refused the token (HTTP {response.status_code}): it is unknown or lacks the scopes "
                f"{', '.join(CLI_SCOPES)}, which the dolab-cli service's token (<data dir>/cli-token) has."
            )
        if response.status_code == 404:
            raise CliError(f"No JupyterHub API at {api} (HTTP 404): check --url (the hub's address and base URL).")
        if response.status_code != 200:
            raise CliError(f"The hub answered HTTP {response.status_code} to GET {api}; its log says why.")
        try:
            data = response.json()
        except ValueError:
            data = None
        if isinstance(data, list):  # a hub that ignores the pagination media type
            return users + [u for u in data if isinstance(u, dict)]
        if not isinstance(data, dict) or not isinstance(data.get("items"), list):
            raise CliError(f"The answer from {api} is not a JupyterHub user list: is {base} a JupyterHub?")
        users.extend(u for u in data["items"] if isinstance(u, dict))
        following = (data.get("_pagination") or {}).get("next")
        if not isinstance(following, dict):
            return users
        try:
            offset, limit = int(following["offset"]), int(following["limit"])
        except (KeyError, TypeError, ValueError):
            return users
        if offset <= int(params.get("offset", 0)):  # a page that does not move on would loop forever
            return users
        params = {"state": "active", "offset": offset, "limit": limit}


def local_inventory(
    env: Mapping[str, str], read: Callable[[], list[GpuSlot]] = read_nvml_inventory, timeout_seconds: float = 10
) -> list[GpuSlot]:
    """The GPUs as the shipped config's hub sees them: ``DOLAB_GPU_INVENTORY`` when set (it replaces NVML
    there), else NVML on this machine; both kept to ``DOLAB_GPU_IDS`` when set.
    """
    gpu_ids = env_list(env, "DOLAB_GPU_IDS")
    try:
        static = static_inventory(env)
    except ValueError as e:
        raise CliError(str(e)) from None
    if static is not None:
        return restrict(static, gpu_ids)
    try:
        found = run_with_timeout(read, timeout_seconds)
    except Exception as e:
        print(f"dolab: cannot read this machine's GPUs ({_short(e)}); listing held GPUs only.", file=sys.stderr)
        found = []
    return restrict(found, gpu_ids)


def _gpus(args: argparse.Namespace) -> int:
    env = os.environ
    hub_url = args.url or default_hub_url(env)
    data_dir = default_data_dir()
    found = find_token(args.token, env, data_dir)
    if found is None:
        raise CliError(
            f"No API token: pass --token, set JUPYTERHUB_API_TOKEN, or run as the hub's user so that "
            f"{Path(data_dir) / 'cli-token'} exists (set DOLAB_DATA_DIR if the hub uses another data directory)."
        )
    users = fetch_active_users(hub_url, found[0], args.timeout)
    problem = state_problem(users)
    if problem:
        raise CliError(problem)
    rows = slot_rows(users, local_inventory(env))
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    elif not rows:
        print("No GPUs: none on this machine, DOLAB_GPU_INVENTORY is not set, and no server holds one.")
    else:
        print(format_table(GPU_HEADERS, [r.cells() for r in rows]))
        held = len({(r.host, r.uuid) for r in rows if r.user})
        print(f"\n{held} of {len({(r.host, r.uuid) for r in rows})} GPU(s) held.")
    return 0
