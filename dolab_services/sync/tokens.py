"""Each user's own Google Drive token, for backups to their Drive (``DOLAB_SYNC_DRIVE_AUTH=user``).

The DO-LAB Google login (``DOLAB_DRIVE_BACKUP``) keeps the user's ``access_token``, ``refresh_token`` and
``expires_at`` (epoch seconds) in their encrypted auth_state and renews them in the hub before they expire. Backups
read them where they are:

- the sync service through the hub API (:class:`HubAuthStates`: ``GET /hub/api/users/:name``, which shows
  ``auth_state`` only with the ``admin:auth_state`` scope its role gets in this mode and no other);
- the hub's own hooks (a final backup before a stop, a restore at spawn) from the user object in the hub.

They are read again at every backup and restore, and again when a token expires or Drive refuses it during one, so
the hub stays the one place that renews them. :func:`drive_token` turns an auth_state into the store's
:class:`~.drive.UserToken`. Tokens are never logged, never put in a user's server environment, never sent to a
browser: the only sentence about them is :class:`NoDriveToken`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .store import StoreError

if TYPE_CHECKING:
    from ..hubclient import HubClient
    from .config import SyncSettings
    from .drive_auth import UserToken

__all__ = ["DRIVE_SCOPES", "HubAuthStates", "NoDriveToken", "drive_token", "renewer"]

#: Scopes whose token may write DO-LAB's backups to a user's Drive.
DRIVE_SCOPES = frozenset({"https://www.googleapis.com/auth/drive.file", "https://www.googleapis.com/auth/drive"})
#: How long a backup thread waits for the hub to hand over a renewed token.
RENEW_TIMEOUT_SECONDS = 60.0

AuthStateReader = Callable[[str], Coroutine[Any, Any, dict[str, Any] | None]]


class NoDriveToken(StoreError):
    """The user has no usable Google Drive token in their auth_state."""

    def __init__(self, user: str) -> None:
        super().__init__(
            f"{user} has no Google Drive token for backups; sign in with Google again to allow Drive backups."
        )
        self.user = user


def _scopes(value: Any) -> set[str] | None:
    if isinstance(value, str):
        return set(value.split())
    if isinstance(value, list | tuple):
        return {str(s) for s in value}
    return None


def drive_token(
    settings: SyncSettings, auth_state: Any, renew: Callable[[], UserToken | None] | None = None
) -> UserToken | None:
    """The Drive token in ``auth_state`` (as DoLabGoogleAuthenticator keeps it), or None when there is none.

    A token granted without a Drive scope (the user signed in before Drive backups were switched on) counts as none.
    The OAuth client's id and secret come from the service's settings (``DOLAB_SYNC_DRIVE_CLIENT_ID``/``_SECRET``),
    so the store may renew the token itself only where the admin gave them.
    """
    from .drive_auth import UserToken

    if not isinstance(auth_state, dict):
        return None
    access = auth_state.get("access_token")
    refresh = auth_state.get("refresh_token")
    access = access if isinstance(access, str) and access else None
    refresh = refresh if isinstance(refresh, str) else ""
    if access is None and not refresh:
        return None
    granted = _scopes(auth_state.get("scope"))
    if granted is not None and not granted & DRIVE_SCOPES:
        return None
    expires = auth_state.get("expires_at")
    expires_at = (
        datetime.fromtimestamp(float(expires), timezone.utc)
        if isinstance(expires, int | float) and not isinstance(expires, bool)
        else None
    )
    return UserToken(
        access_token=access,
        refresh_token=refresh,
        client_id=settings.drive_client_id,
        client_secret=settings.drive_client_secret,
        expires_at=expires_at,
        token_uri=settings.drive_token_uri,
        renew=renew,
    )


def renewer(
    settings: SyncSettings, user: str, read: AuthStateReader, loop: asyncio.AbstractEventLoop
) -> Callable[[], UserToken | None]:
    """A blocking ``renew`` for a store's worker threads: reads ``user``'s auth_state again on ``loop``."""

    def renew() -> UserToken | None:
        future = asyncio.run_coroutine_threadsafe(read(user), loop)
        return drive_token(settings, future.result(RENEW_TIMEOUT_SECONDS))

    return renew


async def user_drive_token(settings: SyncSettings, user: str, read: AuthStateReader) -> UserToken:
    """``user``'s Drive token read now through ``read``, renewable the same way; :class:`NoDriveToken` if none."""
    loop = asyncio.get_running_loop()
    token = drive_token(settings, await read(user), renewer(settings, user, read, loop))
    if token is None:
        raise NoDriveToken(user)
    return token


class HubAuthStates:
    """Users' auth_state read through the hub API (the sync service's token needs ``admin:auth_state``)."""

    def __init__(self, hub: HubClient) -> None:
        self.hub = hub

    async def __call__(self, user: str) -> dict[str, Any] | None:
        """``user``'s auth_state, or None when the hub keeps none for them."""
        from ..hubclient import HubAPIError

        try:
            model = await self.hub.request("GET", f"/users/{quote(user, safe='')}")
        except HubAPIError as e:
            raise StoreError(f"The backup service could not read {user}'s Google Drive token from the hub: {e}") from e
        state = model.get("auth_state") if isinstance(model, dict) else None
        return state if isinstance(state, dict) else None
