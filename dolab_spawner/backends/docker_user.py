"""The user a container runs as: which uid a ``user[:group]`` spec means, read the way runc reads it, and an
image's /etc/passwd to resolve a name with. The docker backend refuses any spec that means uid 0.
"""

from __future__ import annotations

import asyncio
import io
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor

import docker
import docker.errors

__all__ = ["image_passwd", "run_as_uid"]

_UID = re.compile(r"[0-9]{1,10}")
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_MAX_PASSWD_BYTES = 1 << 20


def run_as_uid(spec: str, passwd: str | None) -> int | None:
    """The uid a container created with user ``spec`` (``user[:group]``) runs as, resolved the way runc does;
    None when ``spec`` names a user and ``passwd`` (the image's /etc/passwd) is not given.

    Only plain forms are accepted: a decimal uid (``0000`` is uid 0) or an account name, each optionally with a
    decimal gid or group name. Raises ValueError with a sentence for anything else (``+0``, ``-0``, an empty user,
    spaces), and for a name the image does not have.
    """
    user, _, group = spec.partition(":")
    if not (_UID.fullmatch(user) or _ACCOUNT.fullmatch(user)) or (
        ":" in spec and not (_UID.fullmatch(group) or _ACCOUNT.fullmatch(group))
    ):
        raise ValueError(f"the user {spec!r} is not of the form uid[:gid] or name[:group]")
    if _UID.fullmatch(user):
        return int(user)  # runc reads a numeric user as a uid, never as a name
    if user == "root":
        return 0
    if passwd is None:
        return None
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == user:
            # runc reads a uid field that is not a number as 0.
            return int(fields[2]) if re.fullmatch(r"[+-]?[0-9]+", fields[2]) else 0
    raise ValueError(f"the image has no user {user!r}")


#: (engine, image id) -> the image's /etc/passwd; image ids name their content, so an entry never goes stale.
_passwd_cache: dict[tuple[str, str], str] = {}


def _read_passwd(client: docker.APIClient, image_id: str, labels: dict[str, str]) -> str:
    """The image's /etc/passwd, through a container that is created, read and removed, never started; ValueError
    with a sentence when it has none that can be read (a name cannot be checked then)."""
    created = client.create_container(
        image_id,
        command=["/nonexistent"],
        entrypoint=[],
        labels=labels,
        network_disabled=True,
        host_config=client.create_host_config(network_mode="none"),
    )
    try:
        try:
            stream, stat = client.get_archive(created["Id"], "/etc/passwd")
        except docker.errors.NotFound:
            raise ValueError("the image has no /etc/passwd") from None
        if int(stat.get("size") or 0) > _MAX_PASSWD_BYTES:
            raise ValueError("the image's /etc/passwd is too large")
        data = bytearray()
        for chunk in stream:
            data += chunk
            if len(data) > _MAX_PASSWD_BYTES + 65536:
                raise ValueError("the image's /etc/passwd is too large")
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as archive:
            member = next(iter(archive.getmembers()), None)
            if member is None or not member.isfile():
                raise ValueError("the image's /etc/passwd is not a plain file")
            reader = archive.extractfile(member)
            return reader.read(_MAX_PASSWD_BYTES).decode("utf-8", errors="replace") if reader else ""
    finally:
        client.remove_container(created["Id"], force=True)


async def image_passwd(
    executor: ThreadPoolExecutor, client: docker.APIClient, engine: str, image_id: str, labels: dict[str, str]
) -> str:
    """The image's /etc/passwd on ``engine`` (read once per engine and image id, on ``executor``, from a container
    that is never started and carries ``labels``)."""
    key = (engine, image_id)
    if key not in _passwd_cache:
        passwd = await asyncio.wrap_future(executor.submit(_read_passwd, client, image_id, labels))
        if len(_passwd_cache) >= 64:
            _passwd_cache.pop(next(iter(_passwd_cache)))
        _passwd_cache[key] = passwd
    return _passwd_cache[key]
