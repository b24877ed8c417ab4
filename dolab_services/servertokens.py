"""Tokens that let a service call one user's server, and nothing else (:class:`ServerTokens`).

A user's server is the user's to control: her code runs in it, her ``jupyter_server_config.py`` configures it, and
on a rented pod she is root. Whatever a service sends to that server, she can record. So a service never calls a
user's server with its own token (which would let her act as the service: stop or read everyone's servers).
Instead it asks the hub for a token **owned by that user** and limited to ``access:servers!server=<user>/<name>``:
if she records it, she holds access to her own server, which she had already.

The service's role needs the ``tokens`` scope for that (the hub checks the requested scopes against the *owner's*
own, so the new token can never exceed what the user already holds). Tokens live ``lifetime_seconds`` (one hour by
default), are reused while they have time left, minted again when the server refuses one (its owner may revoke it
on her token page), and revoked when the service no longer needs them (:meth:`ServerTokens.prune`,
:meth:`ServerTokens.revoke_all`). A service that dies leaves tokens that expire on their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote

from .hubclient import HubAPIError, HubClient

__all__ = ["ServerTokens", "revoke_quietly", "server_scope"]

log = logging.getLogger("dolab.servertokens")

T = TypeVar("T")


def server_scope(user: str, server: str) -> str:
    """The scope that reaches exactly one server: ``access:servers!server=<user>/<name>`` ("" is the default)."""
    return f"access:servers!server={user}/{server}"


@dataclass
class _Minted:
    token: str
    token_id: str
    expires: float  # time.monotonic()


class ServerTokens:
    """Per-server tokens a service mints through the hub, cached until shortly before they expire.

    ``purpose`` goes into each token's note, which the user sees on her token page (e.g. "dolab-culler: reads
    this server's kernels").
    """

    def __init__(self, hub: HubClient, purpose: str, *, lifetime_seconds: int = 3600) -> None:
        if lifetime_seconds < 120:
            raise ValueError("a server token must live at least 120 seconds")
        self.hub = hub
        self.purpose = purpose
        self.lifetime_seconds = lifetime_seconds
        self._tokens: dict[tuple[str, str], _Minted] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def get(self, user: str, server: str, *, valid_for_seconds: float = 300) -> str:
        """A token for ``user``'s server ``server`` that stays valid at least ``valid_for_seconds`` more.

        Raises :class:`~.hubclient.HubAPIError` when the hub refuses to mint it (the service's role lacks
        ``tokens``, or the user is gone).
        """
        key = (user, server)
        valid_for_seconds = min(valid_for_seconds, self.lifetime_seconds - 60)
        async with self._locks.setdefault(key, asyncio.Lock()):
            minted = self._tokens.get(key)
            if minted is not None and minted.expires - time.monotonic() >= valid_for_seconds:
                return minted.token
            if minted is not None:
                await self._revoke(user, minted)
            minted = await self._mint(user, server)
            self._tokens[key] = minted
            return minted.token

    async def use(
        self,
        user: str,
        server: str,
        action: Callable[[str], Awaitable[T]],
        is_refusal: Callable[[Exception], bool],
        *,
        valid_for_seconds: float = 300,
    ) -> T:
        """``await action(token)`` with a token for that server; when the server refuses it (``is_refusal`` of
        the error: its owner may have revoked it on her token page), once more with a new one.

        Raises :class:`~.hubclient.HubAPIError` when the hub mints none, and what ``action`` raises otherwise.
        """
        for attempt in (1, 2):
            token = await self.get(user, server, valid_for_seconds=valid_for_seconds)
            try:
                return await action(token)
            except Exception as e:
                if not is_refusal(e):
                    raise
                await self.refused(user, server, token)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def refused(self, user: str, server: str, token: str) -> None:
        """The server refused ``token`` (401/403): forget it, so the next :meth:`get` mints another."""
        key = (user, server)
        minted = self._tokens.get(key)
        if minted is not None and minted.token == token:
            del self._tokens[key]
            await self._revoke(user, minted)

    async def prune(self, present: set[tuple[str, str]]) -> None:
        """Revoke the tokens of servers not in ``present`` (``(user, server)`` pairs still running)."""
        for key in [k for k in self._tokens if k not in present]:
            minted = self._tokens.pop(key)
            self._locks.pop(key, None)
            await self._revoke(key[0], minted)

    async def revoke_all(self) -> None:
        """Revoke every token this service holds (at shutdown)."""
        await self.prune(set())

    def __len__(self) -> int:
        return len(self._tokens)

    async def _mint(self, user: str, server: str) -> _Minted:
        body = {
            "scopes": [server_scope(user, server)],
            "expires_in": self.lifetime_seconds,
            "note": f"{self.purpose} ({user}/{server}, expires by itself)",
        }
        started = time.monotonic()
        model = await self.hub.request("POST", f"/users/{quote(user, safe='')}/tokens", body)
        if not isinstance(model, dict) or not isinstance(model.get("token"), str) or not model["token"]:
            raise HubAPIError(200, f"The hub did not answer a token for {user}/{server}.")
        log.debug("Minted a token for server %s/%s (%s)", user, server, self.purpose)
        return _Minted(model["token"], str(model.get("id") or ""), started + self.lifetime_seconds)

    async def _revoke(self, user: str, minted: _Minted) -> None:
        if not minted.token_id:
            return
        try:
            await self.hub.request("DELETE", f"/users/{quote(user, safe='')}/tokens/{quote(minted.token_id)}")
        except HubAPIError as e:
            if e.status != 404:  # already gone (expired, revoked by its owner, user deleted) is fine
                log.warning("Could not revoke a server token of %s (%s); it expires by itself", user, e)


async def revoke_quietly(tokens: ServerTokens, timeout_seconds: float = 5) -> None:
    """At a service's shutdown: revoke what it holds if the hub answers soon; tokens left expire by themselves."""
    try:
        await asyncio.wait_for(tokens.revoke_all(), timeout_seconds)
    except (Exception, asyncio.CancelledError):  # shutting down: the hub may be going away too
        log.debug("Server tokens left to expire by themselves")
