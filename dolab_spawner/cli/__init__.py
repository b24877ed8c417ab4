"""The ``dolab`` command: ``dolab doctor`` checks what this machine has for a hub (:mod:`.doctor`), ``dolab gpus``
shows which server holds which GPU (:mod:`.gpus`), ``dolab pull`` pulls images onto the Docker engines ahead of
time (:mod:`.pull`); :mod:`.common` holds what they share.

Errors are one sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from . import backups
from .common import DEFAULT_HUB_URL, CliError
from .doctor import _doctor
from .gpus import CLI_SCOPES, _gpus
from .pull import _pull

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """``dolab`` with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="dolab",
        description="DO-LAB's command line: check this machine, see who holds which GPU, pull images ahead.",
    )
    parser.add_argument("--version", action="version", version=f"dolab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    url_help = f"the hub's URL (default: $DOLAB_HUB_URL, else $DOLAB_BIND_URL, else {DEFAULT_HUB_URL})"

    doctor = commands.add_parser(
        "doctor",
        help="check what this machine has for a hub",
        description="Check what this machine has for a hub. Exit 1 when the embedded default "
        "(proxy, database, single-user server) cannot run.",
    )
    doctor.add_argument("--url", help=url_help)
    doctor.set_defaults(handler=_doctor)

    gpus = commands.add_parser(
        "gpus",
        help="list every GPU slot and the server holding it",
        description="List every GPU slot and the server holding it, from the hub's REST API.",
    )
    gpus.add_argument("--url", help=url_help)
    gpus.add_argument(
        "--token",
        help="an API token with the scopes " + ", ".join(CLI_SCOPES) + " (default: $JUPYTERHUB_API_TOKEN, "
        "else the file cli-token in the data directory)",
    )
    gpus.add_argument("--json", action="store_true", help="print the rows as JSON")
    gpus.add_argument("--timeout", type=float, default=10, help="seconds to wait for each answer (default: 10)")
    gpus.set_defaults(handler=_gpus)

    pull = commands.add_parser(
        "pull",
        help="pull images onto every Docker engine ahead of time",
        description="Pull images onto every Docker engine ahead of time, so that no spawn waits for a pull. With no "
        "image named, every image the hub config names (run it with the hub's environment: DOLAB_PROFILES...). "
        "Exit 1 when a pull failed.",
    )
    pull.add_argument("images", nargs="*", metavar="IMAGE", help="images to pull (default: those the config names)")
    pull.add_argument(
        "--config", help="the hub's config file (default: jupyterhub_config.py in the current directory, else DO-LAB's)"
    )
    pull.add_argument(
        "--docker-host",
        metavar="URL",
        help="pull onto this one engine (unix://, tcp://, ssh://) instead of the config's docker_hosts",
    )
    pull.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds a pull may go without progress before it is given up (default: 900)",
    )
    pull.set_defaults(handler=_pull)

    backups.add_parser(commands, url_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dolab``; returns the exit code (0 ok, 1 doctor found a missing part or a pull failed, 2 an error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else 0
    try:
        return int(args.handler(args))
    except CliError as e:
        print(f"dolab: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
