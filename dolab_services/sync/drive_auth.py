"""Google Drive credentials, and the authorized connections a :class:`~.drive.DriveStore` makes from them.

Two kinds of :data:`DriveCredentials`:

- :class:`ServiceAccountKey`: the JSON key file of a service account (its ``token_uri`` is honoured); the backups
  then live in the service account's own Drive, one folder per user.
- :class:`UserToken`: a user's OAuth token, as the DO-LAB authenticator stores it with the ``drive.file`` scope
  (:mod:`.tokens` reads it from auth_state), with the OAuth client's id, secret and token endpoint; the backups live
  in the user's own Drive. When the access token has expired (or Drive answers 401) a fresh one comes from
  ``UserToken.renew`` (the hub, which renews tokens), and only failing that from the token endpoint, when the OAuth
  client's id and secret are known.

:class:`DriveAuth` is one store's authorization: pydrive2's ``GoogleAuth`` built from the credentials, one
authorized connection (with a socket timeout) per thread, the token refreshed ahead of its expiry, and the sentence
refused credentials become ("sign in again" for a user).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .store import StoreError


def _import_pydrive2() -> None:
    """Import pydrive2, working around a broken pyOpenSSL.

    pydrive2 imports oauth2client, which tries pyOpenSSL first and only falls back (to its pure-Python RSA signer,
    on ``rsa``) on ImportError. pydrive2 pins ``pyOpenSSL<=24.2.1`` and every such release caps ``cryptography``
    below 44, while runpod 1.12 needs ``cryptography>=50``; pip can then only pick pyOpenSSL 22, whose import
    fails with AttributeError. That pyOpenSSL is unusable anyway, so it is marked missing and oauth2client falls
    back as designed.
    """
    try:
        import OpenSSL.crypto  # noqa: F401
    except ImportError:
        pass
    except AttributeError:
        sys.modules["OpenSSL"] = None  # type: ignore[assignment]


_import_pydrive2()

import httplib2  # noqa: E402
from oauth2client.client import AccessTokenRefreshError, OAuth2Credentials  # noqa: E402
from pydrive2.auth import GoogleAuth  # noqa: E402
from pydrive2.settings import InvalidConfigError  # noqa: E402

__all__ = [
    "GOOGLE_TOKEN_URI",
    "SCOPE_DRIVE_FILE",
    "DriveAuth",
    "DriveCredentials",
    "ServiceAccountKey",
    "UserToken",
]

log = logging.getLogger(__name__)

SCOPE_DRIVE_FILE = "https://www.googleapis.com/auth/drive.file"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"


@dataclass(frozen=True)
class ServiceAccountKey:
    """A service account's JSON key file (``subject``: a Workspace user to impersonate by domain-wide delegation)."""

    key_file: Path
    subject: str | None = None


@dataclass(frozen=True)
class UserToken:
    """A user's Google OAuth token, as the authenticator keeps it in auth_state.

    ``expires_at`` is when ``access_token`` stops working (aware datetime; None: unknown, refreshed on a 401).

    ``renew``: where a fresh token comes from when this one has expired or Drive refused it (the sync service reads
    the user's auth_state again from the hub, which renews tokens). It is asked first; the store renews the token
    itself with ``refresh_token`` only when ``renew`` gives nothing fresher and the OAuth client's id and secret are
    known. Without either, an expired token ends the operation with the "sign in again" sentence.
    """

    access_token: str | None
    refresh_token: str
    client_id: str
    client_secret: str
    expires_at: datetime | None = None
    token_uri: str = GOOGLE_TOKEN_URI
    renew: Callable[[], UserToken | None] | None = field(default=None, compare=False)

    @property
    def can_refresh(self) -> bool:
        """Whether this token can be renewed here, with the refresh token and the OAuth client's credentials."""
        return bool(self.refresh_token and self.client_id and self.client_secret)

    def __repr__(self) -> str:
        return f"UserToken(client_id={self.client_id!r}, expires_at={self.expires_at!r})"


def _naive_utc(moment: datetime | None) -> datetime | None:
    """oauth2client's expiry: a naive UTC datetime."""
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment else None


class _RenewableCredentials(OAuth2Credentials):
    """oauth2client credentials that get a fresh access token from :attr:`UserToken.renew` (the hub) first, and
    only then, when they can, from the token endpoint with the refresh token."""

    def __init__(self, token: UserToken, scope: str) -> None:
        super().__init__(
            access_token=token.access_token,
            client_id=token.client_id,
            client_secret=token.client_secret,
            refresh_token=token.refresh_token,
            token_expiry=_naive_utc(token.expires_at),
            token_uri=token.token_uri,
            user_agent="dolab-sync",
            scopes=[scope],
        )
        self._token = token

    def _do_refresh_request(self, http: Any) -> None:
        fresh = self._token.renew() if self._token.renew is not None else None
        soon = datetime.now(timezone.utc) + timedelta(seconds=60)
        if (
            fresh is not None
            and fresh.access_token
            and fresh.access_token != self.access_token
            and (fresh.expires_at is None or fresh.expires_at > soon)
        ):
            self.access_token = fresh.access_token
            self.token_expiry = _naive_utc(fresh.expires_at)
            self.invalid = False
            return
        if self._token.can_refresh:
            super()._do_refresh_request(http)
            return
        self.invalid = True
        raise AccessTokenRefreshError("no fresh access token")


DriveCredentials = ServiceAccountKey | UserToken


class DriveAuth:
    """One store's authorization to Drive for ``user`` with ``credentials`` and ``scope``: pydrive2's
    ``GoogleAuth`` (:attr:`google_auth`, whose ``http`` and ``service`` the store sets up), one authorized
    connection per thread with a socket timeout of ``timeout_seconds``, and the token kept fresh.

    Raises :class:`~.store.StoreError` with a sentence when the credentials cannot be used at all (an unreadable
    key file; a user token that can neither be used nor renewed).
    """

    def __init__(self, user: str, credentials: DriveCredentials, scope: str, timeout_seconds: float) -> None:
        self.user = user
        self.credentials = credentials
        self.timeout_seconds = timeout_seconds
        self._refresh_lock = threading.Lock()
        self.google_auth = self._google_auth(scope)

    def new_http(self) -> httplib2.Http:
        """A new, unauthorized connection with the socket timeout."""
        http = httplib2.Http(timeout=self.timeout_seconds)
        # Drive answers 308 Resume Incomplete to resumable upload chunks: not a redirect to follow.
        http.redirect_codes = http.redirect_codes - {308}
        return http

    def _google_auth(self, scope: str) -> GoogleAuth:
        creds = self.credentials
        if isinstance(creds, ServiceAccountKey):
            try:
                auth = GoogleAuth(
                    settings={
                        "client_config_backend": "service",
                        "service_config": {
                            "client_json_file_path": str(creds.key_file),
                            "client_user_email": creds.subject,
                        },
                        "oauth_scope": [scope],
                    },
                    http_timeout=self.timeout_seconds,
                )
                auth.ServiceAuth()  # reads the key; no request yet (the first API call fetches a token)
            except (OSError, ValueError, KeyError, InvalidConfigError) as e:
                raise StoreError(
                    "The Google Drive service account key could not be read; an admin must check the key file "
                    "configured for the sync service."
                ) from e
            return auth
        if not creds.access_token and not creds.can_refresh:
            raise StoreError(self.refused_sentence())
        auth = GoogleAuth(
            settings={
                "client_config_backend": "settings",
                "client_config": {
                    "client_id": creds.client_id,
                    "client_secret": creds.client_secret,
                    "token_uri": creds.token_uri,
                },
                "oauth_scope": [scope],
                "get_refresh_token": True,
            },
            http_timeout=self.timeout_seconds,
        )
        auth.credentials = _RenewableCredentials(creds, scope)
        return auth

    def http(self) -> httplib2.Http:
        """This thread's authorized connection (the one pydrive2's own calls use too)."""
        local = self.google_auth.thread_local
        if getattr(local, "http", None) is None:
            local.http = self.google_auth.credentials.authorize(self.new_http())
        return local.http

    def ensure_fresh(self) -> None:
        """Refresh the access token ahead of its expiry (pydrive2 would otherwise try an interactive login)."""
        creds = self.google_auth.credentials
        expiry = getattr(creds, "token_expiry", None)
        soon = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(seconds=60)
        if creds.access_token and not creds.invalid and (expiry is None or expiry > soon):
            return
        with self._refresh_lock:
            if creds.access_token and not creds.invalid and (creds.token_expiry is None or creds.token_expiry > soon):
                return
            creds.refresh(self.new_http())
            log.info("Refreshed the Google Drive access token for %s", self.user)

    def refused_sentence(self) -> str:
        """What to tell when Google refuses these credentials."""
        if isinstance(self.credentials, UserToken):
            return (
                f"Google Drive refused the stored credentials of {self.user}; sign in to DO-LAB again with Google "
                "to renew them."
            )
        return (
            "Google Drive refused the sync service's service account credentials; an admin must check its key file "
            "and that the account is enabled."
        )

    def close(self) -> None:
        """Drop every thread's connection."""
        self.google_auth.thread_local.__dict__.clear()
