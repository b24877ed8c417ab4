"""System accounts for local servers: one per hub user, made on first spawn, as The Littlest JupyterHub does.

With the hub run as root, the local backend runs each user's server as an account of its own
(``<prefix><name>``), so a user's server, kernels and terminals can read neither the hub's secrets nor other
users' workspaces. This module holds the parts that do not need a spawner:

- :func:`account_name` maps any hub user name to a name ``useradd`` accepts (at most 32 characters), the same
  one every time and never the same one for two hub names;
- :func:`ensure_account` finds or creates the account (``useradd`` off the event loop, bounded in time, one at a
  time per name), and refuses system and root accounts;
- :func:`hand_over_workspace` makes the workspace the account's (mode 0700); a workspace that root made
  earlier is handed over entry by entry through directory descriptors, never following a link;
- :func:`unreachable_folder` says which folder keeps an account from a path, for a sentence instead of a
  server that dies at start.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import pwd
import re
import stat
import subprocess
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "NAME_MAX",
    "PREFIX_MAX",
    "Account",
    "AccountError",
    "account_name",
    "check_prefix",
    "ensure_account",
    "hand_over_workspace",
    "unreachable_folder",
]

log = logging.getLogger(__name__)

#: The longest account name ``useradd`` accepts.
NAME_MAX = 32
#: The longest prefix, so that every hub name keeps a readable part beside its hash.
PREFIX_MAX = 16
#: Hex digits of the hash that names a hub name which cannot be used as it is (40 bits).
_HASH_DIGITS = 10
#: Hub names used as they are (after the prefix): lower-case letters, digits and dashes, no leading dash.
_PLAIN = re.compile(r"[a-z0-9][a-z0-9-]*")
#: What ``useradd`` accepts everywhere (Debian, RHEL): no leading digit or dash, nothing but ``[a-z0-9_-]``.
_VALID = re.compile(r"[a-z_][a-z0-9_-]*")
_PREFIX = re.compile(r"[a-z][a-z0-9_-]*")

#: Below this uid are the system's own accounts (daemon, www-data...): a server never runs as one.
_DEFAULT_UID_MIN = 1000

# useradd, getpwnam and the hand-over walk block: they run here, never on the hub's event loop.
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dolab-accounts")
# One creation per account name at a time, so two spawns of one user make one account.
_LOCKS: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
# Hand-overs under way, by workspace: a second spawn waits for the first instead of walking the tree again.
_HANDOVERS: dict[str, asyncio.Future[Any]] = {}

T = TypeVar("T")


class AccountError(Exception):
    """An account could not be found, made or used; ``str()`` is a sentence for the user, ``detail`` for the log."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


@dataclass(frozen=True)
class Account:
    """A system account a server runs as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    shell: str


def check_prefix(prefix: str, creating: bool = True) -> str:
    """``prefix`` when it can start account names; otherwise a ValueError with a sentence.

    Accounts that DO-LAB creates need a prefix (``jupyter-``): without one a hub user named like a real account
    (``cloudsdk``, an admin's own) would be given that account. Empty is allowed only for accounts the admin made
    with the hub users' own names.
    """
    if not prefix:
        if creating:
            raise ValueError(
                "the system account prefix is empty: accounts DO-LAB creates need one (e.g. 'jupyter-'), so that no"
                " hub user name can stand for an existing account"
            )
        return prefix
    if len(prefix) > PREFIX_MAX or not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"the system account prefix {prefix!r} is not usable: up to {PREFIX_MAX} characters, a lower-case letter"
            " first, then lower-case letters, digits, '-' or '_'"
        )
    return prefix


def account_name(hub_name: str, prefix: str) -> str:
    """The account a hub user's servers run as: ``prefix`` + the name, or + a readable part and a hash.

    A name of lower-case letters, digits and dashes that fits is used as it is (``alice`` -> ``jupyter-alice``).
    Any other (capitals, ``@``, ``.``, non-ASCII, too long) becomes its letters and digits, cut to fit, then ``_``
    and a hash of the whole name (``Kim.O'Neil@x.org`` -> ``jupyter-kim-o-neil-x-org_3f2a...``). Plain names never
    contain ``_``, hashed ones always do, so two hub names never share an account (short of a 40-bit hash
    collision), and the same name always gets the same account.
    """
    plain = prefix + hub_name
    if _PLAIN.fullmatch(hub_name) and len(plain) <= NAME_MAX and _VALID.fullmatch(plain):
        return plain
    digest = hashlib.sha256(hub_name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_DIGITS]
    readable = re.sub(r"[^a-z0-9]+", "-", hub_name.lower()).strip("-")
    # Without a prefix (the admin's own accounts) the name must not start with a digit: "_" leads instead.
    lead = prefix or ("_" if readable[:1].isdigit() else "")
    room = NAME_MAX - len(lead) - 1 - _HASH_DIGITS
    readable = readable[:room].rstrip("-")
    return f"{lead}{readable}_{digest}"


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_POOL, fn, *args)


async def ensure_account(name: str, home: str, shell: str, create: bool = True, timeout_seconds: float = 60) -> Account:
    """The account ``name``, made first (``useradd``) when it is missing and ``create`` is on.

    Runs off the event loop; two calls for one name at once make one account. Raises :class:`AccountError`.
    """
    lock = _LOCKS.get(name)
    if lock is None:
        lock = _LOCKS[name] = asyncio.Lock()
    async with lock:
        try:
            return await asyncio.wait_for(
                _off_loop(_find_or_create, name, home, shell, create, timeout_seconds), timeout_seconds + 5
            )
        except asyncio.TimeoutError:
            raise AccountError(
                "Making your account on this machine took too long. Try again in a minute.",
                f"useradd {name} did not finish in {timeout_seconds} s",
            ) from None


def _uid_min() -> int:
    """UID_MIN of /etc/login.defs (where regular accounts start), else 1000."""
    try:
        with open("/etc/login.defs", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "UID_MIN" and parts[1].isdigit():
                    return int(parts[1])
    except OSError:
        pass
    return _DEFAULT_UID_MIN


def _find_or_create(name: str, home: str, shell: str, create: bool, timeout_seconds: float) -> Account:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if not create:
            raise AccountError(
                "There is no account for you on this machine. Ask an administrator to create it.",
                f"system account {name} does not exist and create_system_users is off",
            ) from None
        entry = _useradd(name, home, shell, timeout_seconds)
    uid_min = _uid_min()
    groups = tuple(os.getgrouplist(name, entry.pw_gid))
    if entry.pw_uid == 0 or entry.pw_uid < uid_min or 0 in groups:
        # A system account, root or a member of root's group must never run a user's server, nor get a workspace.
        raise AccountError(
            "Your server cannot run under the account this machine has for you. Ask an administrator.",
            f"account {name} has uid {entry.pw_uid} and groups {list(groups)}: below UID_MIN {uid_min}, or root's",
        )
    return Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups, shell=entry.pw_shell or shell)


def _useradd(name: str, home: str, shell: str, timeout_seconds: float) -> pwd.struct_passwd:
    command = [
        "useradd",
        "--home-dir",
        home,
        "--no-create-home",  # the workspace is made (and handed over) by the backend
        "--shell",
        shell,
        "--user-group",
        "--no-log-init",
        "--comment",
        "DO-LAB user",
        # No subordinate ids: these accounts never run user namespaces, and /etc/subuid stays as it is.
        "-K",
        "SUB_UID_COUNT=0",
        "-K",
        "SUB_GID_COUNT=0",
        "--",
        name,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_seconds, check=False)
    except subprocess.TimeoutExpired:
        raise AccountError(
            "Making your account on this machine took too long. Try again in a minute.",
            f"useradd {name} did not finish in {timeout_seconds} s",
        ) from None
    except OSError as e:
        raise AccountError(
            "This machine cannot make an account for you. Ask an administrator.",
            f"cannot run useradd ({e}); install the passwd package or create the accounts yourself",
        ) from None
    if done.returncode not in (0, 9):  # 9: made by someone else meanwhile, which is just as good
        raise AccountError(
            "This machine could not make an account for you. Ask an administrator.",
            f"useradd {name} failed ({done.returncode}): {done.stderr.strip()[:500]}",
        )
    log.info("Created system account %s (home %s)", name, home)
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise AccountError(
            "This machine could not make an account for you. Ask an administrator.",
            f"useradd {name} succeeded but the account is not there",
        ) from None


async def hand_over_workspace(path: str, account: Account) -> None:
    """Make ``path`` the account's folder with mode 0700 (created when missing); off the event loop.

    A folder that someone else owns (root made it before accounts existed, a restore made it) is handed over
    whole: :func:`_hand_over` walks it. Two spawns of one user share one walk.
    """
    running = _HANDOVERS.get(path)
    if running is None:
        running = asyncio.ensure_future(_off_loop(_hand_over, path, account))
        _HANDOVERS[path] = running
        running.add_done_callback(lambda _: _HANDOVERS.pop(path, None))
    await asyncio.shield(running)


def _hand_over(path: str, account: Account) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    # O_NOFOLLOW: the workspace itself is never a link (its parent is the hub's, but be sure).
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        top = os.fstat(fd)
        if (top.st_uid, top.st_gid) != (account.uid, account.gid):
            started = time.monotonic()
            changed, skipped = _chown_tree(fd, account.uid, account.gid)
            # The top folder last: a walk cut short leaves it as it was, and the next spawn walks again.
            os.fchown(fd, account.uid, account.gid)
            log.info(
                "Handed workspace %s over to %s: %d entries in %.1f s%s",
                path,
                account.name,
                changed,
                time.monotonic() - started,
                f"; left {skipped} files with several hard links as they were" if skipped else "",
            )
        if stat.S_IMODE(top.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _chown_tree(top_fd: int, uid: int, gid: int) -> tuple[int, int]:
    """Give every entry under the folder ``top_fd`` to ``uid:gid``; returns (changed, skipped).

    Walks by directory descriptors (``os.fwalk`` checks each folder it enters is the one it listed, so a folder
    swapped for a link is not entered) and changes links themselves, never what they point at. Files with more
    than one hard link are left alone: a link planted to a file outside the workspace must not hand that file over.
    """
    changed = skipped = 0
    for _, dirnames, filenames, dir_fd in os.fwalk(".", dir_fd=top_fd, follow_symlinks=False):
        for name in (*dirnames, *filenames):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode) and st.st_nlink > 1:
                    skipped += 1
                    continue
                if (st.st_uid, st.st_gid) != (uid, gid):
                    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
                    changed += 1
            except FileNotFoundError:
                continue  # gone meanwhile
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ESTALE):
                    raise
    return changed, skipped


def unreachable_folder(path: str, account: Account, need: int = os.X_OK) -> str | None:
    """The first folder above ``path`` that ``account`` may not pass, or ``path`` itself when it lacks ``need``
    (``os.R_OK``/``os.X_OK`` bits) for the account; None when the account gets there. Reads modes only (no ACLs)."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    folder = os.sep
    for part in parts[:-1]:
        folder = os.path.join(folder, part)
        if not _allowed(folder, account, os.X_OK):
            return folder
    return None if _allowed(os.path.abspath(path), account, need) else os.path.abspath(path)


def _allowed(path: str, account: Account, need: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    mode = st.st_mode
    if st.st_uid == account.uid:
        shift = 6
    elif st.st_gid == account.gid or st.st_gid in account.groups:
        shift = 3
    else:
        shift = 0
    bits = (mode >> shift) & 0o7
    return bits & need == need
