"""The local backend: the single-user server as a process on the hub's machine.

Built on JupyterHub's LocalProcessSpawner (signals, pid state, restart adoption), with what DO-LAB adds:
a per-user workspace under a configurable root, GPU pinning through the environment, an optional Python
environment per profile (a venv or conda prefix), a log file per server, and a start that fails with a
sentence when the process dies instead of leaving the hub waiting for it.

Isolation: a hub run as root runs each user's server (and so its kernels and terminals) as a system account of
its own, ``<system_user_prefix><name>``, made on first spawn (:mod:`.system_users`), whose home is the workspace
(mode 0700, owned by it). Root servers only with ``allow_root_servers``. A hub run as another user runs every
server as that user: users share one account. GPU pinning is by environment (CUDA honours it, ``nvidia-smi``
still lists every GPU). Use the docker backend where users must not share a kernel or see each other's processes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner, SpawnException, set_user_setuid
from traitlets import Bool, Float, TraitError, Unicode, default, validate

from dolab_lab.notice import LabNoticeTraits, built_notice, with_jupyter_path

from .base import Backend, child_config, http_answers
from .system_users import (
    Account,
    AccountError,
    account_name,
    check_prefix,
    ensure_account,
    hand_over_workspace,
    unreachable_folder,
)

__all__ = ["LocalProcessBackend", "check_local_accounts"]

#: The umask servers start with: the login default, not the hub's private 077 (``paths.protect_data_dir``).
SERVER_UMASK = 0o022


def _default_singleuser() -> list[str]:
    beside_python = Path(sys.executable).parent / "jupyterhub-singleuser"
    return [str(beside_python)] if beside_python.exists() else ["jupyterhub-singleuser"]


def _programs(command: str) -> list[str]:
    """``command`` (its real path) and the interpreter of its ``#!`` line: what a server's account must reach."""
    path = shutil.which(command) or command
    programs = [os.path.realpath(path)]
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return programs
    if first.startswith(b"#!") and (words := first[2:].split()):
        programs.append(os.path.realpath(os.fsdecode(words[0])))
    return programs


class LocalProcessBackend(LabNoticeTraits, Backend, LocalProcessSpawner):
    """A single-user server as a local process (``backend: local``)."""

    python_env = Unicode(
        "",
        config=True,
        help="""Prefix of a Python environment (a venv or a conda env) to run the server from.

        Its ``bin/jupyterhub-singleuser`` starts the server, its ``bin`` comes first on PATH, and kernels use
        its Python. Set it per profile or per option choice with ``spawner_override``, e.g.
        ``{"python_env": "/opt/envs/torch"}``. The environment needs ``jupyterhub`` (the hub's version) and
        ``jupyterlab``. Empty: the hub's own environment.
        """,
    )

    system_users = Bool(
        config=True,
        help="""Run each server as a system account of its own (``system_user_prefix`` + the user's name).

        Default: on when the hub runs as root, unless ``allow_root_servers`` is on. The account is made on the
        user's first spawn (``create_system_users``), with the workspace as its home and ``system_user_shell``;
        the workspace becomes its own, mode 0700. The hub must run as root.
        """,
    )

    allow_root_servers = Bool(
        False,
        config=True,
        help="""Let a hub run as root start servers as root (``--allow-root``) instead of as system accounts.

        Every user's server can then read everything on the machine: the hub database, its secrets, every
        workspace. Only for a single trusted user or a throw-away machine; the hub warns at start.
        ``DOLAB_ALLOW_ROOT_SERVERS=1`` sets it in the shipped config.
        """,
    )

    system_user_prefix = Unicode(
        "jupyter-",
        config=True,
        help="""The start of every account name (The Littlest JupyterHub's ``jupyter-``), up to 16 characters.

        ``alice`` runs as ``jupyter-alice``; names that are not lower-case letters, digits and dashes, or that
        would pass useradd's 32 characters, get a readable part and a hash (``jupyter-kim-o-neil_3f2a1c9e0b``).
        Empty only with ``create_system_users = False``: the hub users' own, existing accounts.
        """,
    )

    create_system_users = Bool(
        True,
        config=True,
        help="Create a missing account on the user's first spawn (useradd). Off: the account must exist.",
    )

    system_user_shell = Unicode("/bin/bash", config=True, help="The login shell of accounts DO-LAB creates.")

    system_user_timeout_seconds = Float(
        60, config=True, help="How long a spawn waits for useradd before failing (seconds)."
    )

    log_dir = Unicode(
        "",
        config=True,
        help="Directory for one log file per server (`<user>[-<server>].log`). Empty: inherit the hub's output.",
    )

    ready_timeout_seconds = Float(
        60,
        config=True,
        help="How long start() waits for the server's port to open before giving up (seconds).",
    )

    _account: Account | None = None

    @default("cmd")
    def _default_cmd(self) -> list[str]:
        return _default_singleuser()

    @default("system_users")
    def _default_system_users(self) -> bool:
        return os.geteuid() == 0 and not self.allow_root_servers

    @validate("system_user_prefix")
    def _validate_system_user_prefix(self, proposal: dict) -> str:
        try:
            return check_prefix(proposal["value"], creating=self.create_system_users)
        except ValueError as e:
            raise TraitError(str(e)) from None

    @property
    def account_name(self) -> str:
        """The system account this user's servers run as (with ``system_users``)."""
        return account_name(self.user.name, self.system_user_prefix)

    @default("ip")
    def _default_ip(self) -> str:
        return "127.0.0.1"

    @default("notebook_dir")
    def _default_notebook_dir(self) -> str:
        return self.workspace_dir

    def host_workspace(self) -> str:
        """The workspace: always a folder on this machine."""
        return self.workspace_dir

    def make_preexec_fn(self, name):
        """Switch to the user's account (JupyterHub's ``set_user_setuid``, without its chdir: the process starts in
        the workspace); no switch without ``system_users``."""
        if self.system_users:
            return set_user_setuid(self.account_name, chdir=False)
        return None

    def user_env(self, env: dict) -> dict:
        """USER, LOGNAME, HOME and SHELL for the server, its kernels and terminals: HOME is the workspace."""
        if self.system_users:
            env["USER"] = env["LOGNAME"] = self.account_name
            env["SHELL"] = self._account.shell if self._account is not None else self.system_user_shell
        else:
            env["USER"] = self.user.name
            env["SHELL"] = "/bin/bash"
        env["HOME"] = self.workspace_dir
        return env

    def get_env(self) -> dict[str, str]:
        """The environment, with the profile's Python environment first on PATH and the culler's notice."""
        env = super().get_env()
        if self.python_env:
            prefix = self.python_env
            env["PATH"] = os.pathsep.join([os.path.join(prefix, "bin"), env.get("PATH", os.defpath)])
            if os.path.isdir(os.path.join(prefix, "conda-meta")):
                env["CONDA_PREFIX"] = prefix
                env.pop("VIRTUAL_ENV", None)
            else:
                env["VIRTUAL_ENV"] = prefix
        if self.lab_notice and (share := built_notice(log=self.log)):
            # The culler's warnings inside JupyterLab (dolab_lab.notice).
            env["JUPYTER_PATH"] = with_jupyter_path(env.get("JUPYTER_PATH", ""), str(share))
        return env

    def get_args(self) -> list[str]:
        """jupyter-server refuses to run as root without ``--allow-root``: add it only then."""
        args = super().get_args()
        if os.geteuid() == 0 and not self.system_users and self.allow_root_servers and "--allow-root" not in args:
            args.append("--allow-root")
        return args

    def _command(self) -> list[str]:
        cmd = list(self.cmd)
        if self.python_env:
            exe = os.path.join(self.python_env, "bin", os.path.basename(cmd[0]))
            if not os.access(exe, os.X_OK):
                raise SpawnException(
                    f"The Python environment of this profile ({self.python_env}) has no {os.path.basename(cmd[0])}."
                    " Ask an administrator to install jupyterhub and jupyterlab into it.",
                    reason="python_env",
                    status_code=503,
                )
            cmd[0] = exe
        return cmd

    def _log_path(self) -> str | None:
        if not self.log_dir:
            return None
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        name = self.workspace_dir.rstrip("/").rsplit("/", 1)[-1]
        return os.path.join(self.log_dir, f"{name}{'-' + self.name if self.name else ''}.log")

    def _open_log(self, path: str) -> int:
        """The server's log file, readable by the hub's user only (the server writes to it through the fd)."""
        if os.stat(self.log_dir).st_mode & 0o077:
            os.chmod(self.log_dir, 0o700)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # a log from before this version may be 0644
        return fd

    def _refuse(self, message: str, detail: str, reason: str) -> SpawnException:
        self.log.error("Cannot start the server of %s: %s", self._log_name, detail)
        return SpawnException(message, reason=reason, status_code=503)

    async def _prepare_process_user(self) -> None:
        """The account the server runs as, and its workspace: made and handed over on the first spawn."""
        root = os.geteuid() == 0
        if not self.system_users:
            if root and not self.allow_root_servers:
                raise self._refuse(
                    "This hub is not set up to run servers safely. Ask an administrator.",
                    "the hub runs as root and system_users is off; set allow_root_servers to run servers as root",
                    "root_server",
                )
            if root:
                self.log.warning("The server of %s runs as root (allow_root_servers)", self._log_name)
            os.makedirs(self.workspace_dir, mode=0o700, exist_ok=True)
            return
        if not root:
            raise self._refuse(
                "This hub is not set up to give users accounts of their own. Ask an administrator.",
                "system_users needs the hub to run as root",
                "system_users",
            )
        workspace_root = os.path.dirname(self.workspace_dir)
        if not os.path.isdir(workspace_root):
            os.makedirs(workspace_root, mode=0o711, exist_ok=True)
            os.chmod(workspace_root, 0o711)  # accounts pass to their own workspace, never list the others'
        try:
            account = await ensure_account(
                self.account_name,
                home=self.workspace_dir,
                shell=self.system_user_shell,
                create=self.create_system_users,
                timeout_seconds=self.system_user_timeout_seconds,
            )
            await hand_over_workspace(self.workspace_dir, account)
        except AccountError as e:
            raise self._refuse(str(e), e.detail, "system_users") from None
        for needed in (self.workspace_dir, *_programs(self.cmd[0])):
            blocked = unreachable_folder(needed, account, os.R_OK | os.X_OK)
            if blocked is not None:
                mode = stat.S_IMODE(os.stat(blocked).st_mode) if os.path.exists(blocked) else 0
                raise self._refuse(
                    "Your server cannot start: its account cannot reach its files. Ask an administrator.",
                    f"{account.name} cannot reach {needed}: {blocked} has mode {mode:o}. Let other users traverse"
                    " the folders above it (chmod o+x), or install Python, DO-LAB and the workspaces where they can",
                    "system_users",
                )
        self._account = account

    async def start(self) -> tuple[str, int]:
        """Start the process in the workspace, then wait until it listens or dies."""
        self.cmd = self._command()
        await self._prepare_process_user()
        log_path = self._log_path()
        log_fd = self._open_log(log_path) if log_path else None
        try:
            self.popen_kwargs = {
                "cwd": self.workspace_dir,
                # Never the hub's terminal: on SIGINT jupyter-server would ask it "Shutdown? (y/[n])".
                "stdin": subprocess.DEVNULL,
                "umask": SERVER_UMASK,
                **({"stdout": log_fd, "stderr": subprocess.STDOUT} if log_fd is not None else {}),
            }
            ip, port = await super().start()
        finally:
            if log_fd is not None:
                os.close(log_fd)
        await self._wait_listening(ip, port, log_path)
        return ip, port

    async def _wait_listening(self, ip: str, port: int, log_path: str | None) -> None:
        """Return once the server answers HTTP; a process that exits first is a clear failure.

        The hub's own wait cannot tell a dead process from a slow one (6.1 answers 500), so this does.
        """
        deadline = time.monotonic() + self.ready_timeout_seconds
        while time.monotonic() < deadline:
            status = self.proc.poll() if self.proc is not None else None
            if status is not None:
                where = f" Its log is {log_path}." if log_path else ""
                self.log.warning("Server of %s exited during start-up with code %s.%s", self._log_name, status, where)
                raise SpawnException(
                    f"Your server exited during start-up (exit code {status}). Try again; if it keeps failing,"
                    " an administrator can read its log.",
                    reason="exited",
                    status_code=503,
                )
            if await http_answers(ip, port, f"{self.server.base_url}api"):
                return
            await asyncio.sleep(0.2)
        # Still starting: leave the rest of the wait to the hub's http_timeout.
        self.log.info(
            "Server of %s is not listening after %ss; the hub keeps waiting", self._log_name, self.ready_timeout_seconds
        )


def _unreachable_program_warning(backend: LocalProcessBackend) -> str | None:
    """What an admin must fix before users' accounts can run the server program (a clone under /root, a pyenv
    Python there), said at start-up instead of at each user's first spawn; None when every account reaches it."""
    anyone = Account(name="a user's account", uid=-1, gid=-1, groups=(), shell="")  # owns nothing: "other" bits
    for needed in _programs((backend.cmd or _default_singleuser())[0]):
        blocked = unreachable_folder(needed, anyone, os.R_OK | os.X_OK)
        if blocked is not None:
            mode = stat.S_IMODE(os.stat(blocked).st_mode) if os.path.exists(blocked) else 0
            return (
                f"WARNING: users' accounts cannot reach {needed} ({blocked} has mode {mode:o}), so local servers will"
                f" not start. Let other users traverse it (chmod o+x {blocked}) or install Python and DO-LAB where"
                " they can (e.g. under /opt)."
            )
    return None


def check_local_accounts(
    config: Any, data_dir: str | os.PathLike[str], workspace_root: str | os.PathLike[str]
) -> str | None:
    """Check at start-up how local servers will run, and prepare the data directory for it; a warning or None.

    As root with ``system_users`` (the default), the data directory is protected for users' own accounts
    (:func:`~dolab_core.paths.protect_data_dir`). As root with root servers allowed, the warning to print.
    Raises ValueError with a sentence for root servers nobody allowed or an unusable account prefix. The shipped
    ``jupyterhub_config.py`` calls it after the overlays.
    """
    from dolab_core.paths import protect_data_dir

    from ..spawner import DoLabSpawner  # here: the spawner module imports the backends

    try:
        backend = LocalProcessBackend(config=child_config(config, LocalProcessBackend, DoLabSpawner))
        system_users = backend.system_users
    except TraitError as e:
        raise ValueError(str(e)) from None
    if os.geteuid() != 0:
        return None
    if system_users:
        protect_data_dir(data_dir, workspace_root)
        return _unreachable_program_warning(backend)
    if not backend.allow_root_servers:
        raise ValueError(
            "the hub runs as root, and local servers would run as root too (system_users is off): every user could"
            " read the hub's secrets and every workspace. Turn system_users back on, or allow root servers"
            " explicitly (c.LocalProcessBackend.allow_root_servers = True, DOLAB_ALLOW_ROOT_SERVERS=1)"
        )
    return (
        "WARNING: local servers run as root (allow_root_servers): every user can read the hub's database, its"
        " secrets and every workspace. Unset DOLAB_ALLOW_ROOT_SERVERS to give each user an account of their own."
    )
