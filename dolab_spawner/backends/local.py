"""The local backend: the single-user server as a process on the hub's machine.

Built on JupyterHub's LocalProcessSpawner (signals, pid state, restart adoption), with what DO-LAB adds:
a per-user workspace under a configurable root, GPU pinning through the environment, an optional Python
environment per profile (a venv or conda prefix), a log file per server, and a start that fails with a
sentence when the process dies instead of leaving the hub waiting for it.

Isolation: processes run as the hub's user unless ``system_users`` is on; GPU pinning is by environment
(CUDA honours it, ``nvidia-smi`` still lists every GPU). Use the docker backend where users must not see
each other.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from jupyterhub.spawner import LocalProcessSpawner, SpawnException
from traitlets import Bool, Float, Unicode, default

from dolab_services.culler.labnotice import LabNoticeTraits, built_notice, with_jupyter_path

from .base import BackendMixin, http_answers

__all__ = ["LocalProcessBackend"]


def _default_singleuser() -> list[str]:
    beside_python = Path(sys.executable).parent / "jupyterhub-singleuser"
    return [str(beside_python)] if beside_python.exists() else ["jupyterhub-singleuser"]


class LocalProcessBackend(LabNoticeTraits, BackendMixin, LocalProcessSpawner):
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
        False,
        config=True,
        help="""Run each server as the system user of the same name (LocalProcessSpawner's behaviour).

        The users must exist and the hub must run as root. Off (default): servers run as the hub's user,
        with HOME set to the workspace.
        """,
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

    @default("cmd")
    def _default_cmd(self) -> list[str]:
        return _default_singleuser()

    @default("ip")
    def _default_ip(self) -> str:
        return "127.0.0.1"

    @default("notebook_dir")
    def _default_notebook_dir(self) -> str:
        return self.workspace_dir

    def make_preexec_fn(self, name):
        """Switch to the system user only when asked: DO-LAB users need not exist on the host."""
        if self.system_users:
            return super().make_preexec_fn(name)
        return None

    def user_env(self, env: dict) -> dict:
        """USER and HOME for a user that has no account on the host: HOME is the workspace."""
        if self.system_users:
            return super().user_env(env)
        env["USER"] = self.user.name
        env["HOME"] = self.workspace_dir
        env["SHELL"] = "/bin/bash"
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
            # The culler's warnings inside JupyterLab (dolab_services.culler.labnotice).
            env["JUPYTER_PATH"] = with_jupyter_path(env.get("JUPYTER_PATH", ""), str(share))
        return env

    def get_args(self) -> list[str]:
        """jupyter-server refuses to run as root without ``--allow-root``: add it only then."""
        args = super().get_args()
        if os.geteuid() == 0 and not self.system_users and "--allow-root" not in args:
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

    async def start(self) -> tuple[str, int]:
        """Start the process in the workspace, then wait until it listens or dies."""
        self.cmd = self._command()
        os.makedirs(self.workspace_dir, mode=0o700, exist_ok=True)
        log_path = self._log_path()
        log_file = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed below, the child keeps it
        try:
            self.popen_kwargs = {
                "cwd": self.workspace_dir,
                # Never the hub's terminal: on SIGINT jupyter-server would ask it "Shutdown? (y/[n])".
                "stdin": subprocess.DEVNULL,
                **({"stdout": log_file, "stderr": subprocess.STDOUT} if log_file else {}),
            }
            ip, port = await super().start()
        finally:
            if log_file:
                log_file.close()
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
