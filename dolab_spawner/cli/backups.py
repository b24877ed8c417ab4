"""``dolab backups``: a user's restore points and restores, through the dolab-sync service's API.

- ``dolab backups list``: the restore points, newest first;
- ``dolab backups show SNAPSHOT``: the files one holds;
- ``dolab backups now``: back the workspace up now;
- ``dolab backups restore [--snapshot ID] [--into FOLDER] [PATH ...]``: bring files back into the workspace (all of
  the latest snapshot by default; a deleted file from an older one with ``--snapshot``);
- ``dolab backups target [TARGET]``: where the backups go (``s3``, ``drive``), and the targets the admin allows;
  with TARGET, choose it. Old backups stay where they were made: listing and restoring read the chosen target.

The token is the user's own API token (the hub's Token page): ``--token``, else ``$DOLAB_TOKEN``, else
``$JUPYTERHUB_API_TOKEN``. Admins may add ``--user NAME``. Errors are one sentence (the service's own message).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any
from urllib.parse import urlencode

import requests

from .common import CliError, _http_reason, default_hub_url, format_table

__all__ = ["add_parser", "service_request"]

SERVICE_PATH = "/services/dolab-sync/api/"


def _token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("DOLAB_TOKEN") or os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not token:
        raise CliError("No API token: pass --token (make one on the hub's Token page) or set DOLAB_TOKEN.")
    return str(token)


def service_request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One call to the sync service's API; its answer as JSON, or a CliError with its sentence."""
    base = (args.url or default_hub_url(os.environ)).rstrip("/")
    query = {"user": args.user} if getattr(args, "user", None) and method == "GET" else {}
    url = base + SERVICE_PATH + path + (f"?{urlencode(query)}" if query else "")
    if body is not None and getattr(args, "user", None):
        body = {**body, "user": args.user}
    try:
        reply = requests.request(
            method, url, json=body, headers={"Authorization": f"token {_token(args)}"}, timeout=args.timeout
        )
    except requests.RequestException as e:
        raise CliError(f"The backup service at {base} did not answer ({_http_reason(e)}).") from None
    if reply.status_code == 404 and "application/json" not in reply.headers.get("Content-Type", ""):
        raise CliError(f"{base} has no backup service; backups are off on this hub (DOLAB_SYNC_S3_BUCKET).")
    try:
        data = reply.json()
    except ValueError:
        raise CliError(f"The backup service answered {reply.status_code} without JSON.") from None
    if reply.status_code >= 400:
        raise CliError(str(data.get("message") or f"The backup service answered {reply.status_code}."))
    return data


def _list(args: argparse.Namespace) -> int:
    data = service_request(args, "GET", "backups")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [(s["id"], s.get("created") or "") for s in data["snapshots"]]
    if not rows:
        print(f"No backups yet for {data['user']} (in {data['target']}).")
        if data.get("target_name"):
            print("Backups made to another target stay there: `dolab backups target` shows where yours go.")
        return 0
    print(format_table(("restore point", "taken (UTC)"), rows))
    return 0


def _show(args: argparse.Namespace) -> int:
    data = service_request(args, "GET", f"backups/{args.snapshot}")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(format_table(("path", "bytes"), [(_printable(f["path"]), str(f["size"])) for f in data["files"]]))
    print(f"{len(data['files'])} files, {data['total_bytes']} bytes")
    return 0


def _printable(path: str) -> str:
    """A backed-up name as a terminal can show it: bytes that are not UTF-8 as ``\\xNN``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _now(args: argparse.Namespace) -> int:
    data = service_request(args, "POST", "backup", {})
    if data["snapshot"]:
        print(f"Backed up: restore point {data['snapshot']} ({data['uploaded_files']} files uploaded).")
    else:
        print(f"Nothing changed since restore point {data['previous']}.")
    return 0


def _restore(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"snapshot": args.snapshot, "into": args.into or ""}
    if args.paths:
        body["paths"] = list(args.paths)
    data = service_request(args, "POST", "restore", body)
    where = f" into {args.into}" if args.into else ""
    print(f"Restored {data['files']} files ({data['bytes']} bytes) from {data['snapshot']}{where}.")
    return 0


def _target(args: argparse.Namespace) -> int:
    if args.target:
        data = service_request(args, "PUT", "target", {"target": args.target})
    else:
        data = service_request(args, "GET", "target")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    chosen = "chosen" if args.target else "now"
    print(f"Backups of {data['user']} go to {data['target']} ({data['where']}), {chosen}.")
    others = [t for t in data["allowed"] if t != data["target"]]
    if others:
        print(f"Allowed here: {', '.join(data['allowed'])} (default {data['default']}).")
        print(data["note"])
    return 0


def _run(args: argparse.Namespace) -> int:
    handler = {"list": _list, "show": _show, "now": _now, "restore": _restore, "target": _target}[args.action]
    return handler(args)


def add_parser(commands: Any, url_help: str) -> None:
    """Add ``dolab backups`` to the ``dolab`` command's subparsers."""
    parser = commands.add_parser(
        "backups",
        help="list your workspace's restore points and restore files",
        description="List your workspace's restore points, back it up now, or restore files (the dolab-sync service).",
    )
    parser.add_argument("--url", help=url_help)
    parser.add_argument("--token", help="your API token (default: $DOLAB_TOKEN, else $JUPYTERHUB_API_TOKEN)")
    parser.add_argument("--user", help="(admins) whose backups")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for an answer (default: 600)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the restore points, newest first")
    listing.add_argument("--json", action="store_true", help="print the answer as JSON")
    show = actions.add_parser("show", help="the files a restore point holds")
    show.add_argument("snapshot", metavar="SNAPSHOT", help="a restore point's id (from list)")
    show.add_argument("--json", action="store_true", help="print the answer as JSON")
    actions.add_parser("now", help="back up the workspace now")
    restore = actions.add_parser("restore", help="bring files back into the workspace")
    restore.add_argument("paths", nargs="*", metavar="PATH", help="files or folders, relative to the workspace")
    restore.add_argument("--snapshot", help="the restore point (default: the latest)")
    restore.add_argument("--into", help="a folder of the workspace to restore into (default: where they were)")
    target = actions.add_parser("target", help="where your backups go; choose another allowed target")
    target.add_argument("target", nargs="?", metavar="TARGET", help="the target to choose (s3 or drive)")
    target.add_argument("--json", action="store_true", help="print the answer as JSON")
    parser.set_defaults(handler=_run)
