"""Requests to Google Drive: which failures are retried (with backoff, honouring ``Retry-After``), and the sentence
each failure that retries did not cure becomes.

429, 5xx, rate-limit 403s and network errors are retried; refused credentials, a full Drive, a denied folder are
not. pydrive2 wraps googleapiclient's HTTP errors (and sometimes fails to: a proxy's HTML 502 page makes its
ApiRequestError raise ValueError), so the HTTP error is looked for behind each exception.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

# isort: split
# drive_auth first: it works around a broken pyOpenSSL before googleapiclient and pydrive2 are imported.
from .drive_auth import DriveAuth

# isort: split
import httplib2
from googleapiclient import errors
from oauth2client.client import AccessTokenRefreshError, HttpAccessTokenRefreshError
from pydrive2.auth import AuthError
from pydrive2.files import ApiRequestError

from .store import StoreError

__all__ = ["DriveCalls", "http_error", "status_of"]

log = logging.getLogger(__name__)

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})

T = TypeVar("T")


def http_error(exc: BaseException) -> errors.HttpError | None:
    """The HTTP error behind ``exc``: itself, the one pydrive2 wrapped, or the one pydrive2 failed to wrap
    (its ApiRequestError raises ValueError on a body that is not JSON, such as a proxy's HTML 502 page)."""
    if isinstance(exc, errors.HttpError):
        return exc
    if isinstance(exc, ApiRequestError) and exc.args and isinstance(exc.args[0], errors.HttpError):
        return exc.args[0]
    if isinstance(exc, ValueError):
        context = exc.__context__
        for _ in range(5):
            if context is None or isinstance(context, errors.HttpError):
                return context
            context = context.__context__
    return None


def status_of(exc: BaseException) -> int | None:
    """The HTTP status behind ``exc``, or None when it is no HTTP error."""
    error = http_error(exc)
    return error.resp.status if error is not None else None


def _reason(exc: BaseException) -> str:
    error = http_error(exc)
    if error is None:
        return ""
    try:
        details = json.loads(error.content or b"{}").get("error", {})
        return str((details.get("errors") or [{}])[0].get("reason", ""))
    except (ValueError, AttributeError):
        return ""


class DriveCalls:
    """Runs one store's requests for ``user`` (whose folder is ``description``): each with a fresh token from
    ``auth``, retried up to ``max_retries`` times when Drive says it may be, failures turned into StoreError."""

    def __init__(
        self,
        user: str,
        description: str,
        auth: DriveAuth,
        max_retries: int,
        backoff_base_seconds: float,
        backoff_max_seconds: float,
    ) -> None:
        self.user = user
        self.description = description
        self.auth = auth
        self.max_retries = max_retries
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_max_seconds = backoff_max_seconds

    def _failure(self, exc: BaseException, doing: str) -> StoreError:
        """The sentence for a failure that retries did not cure."""
        status = status_of(exc)
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, AccessTokenRefreshError | AuthError) or status == 401:
            return StoreError(self.auth.refused_sentence())
        if status == 403:
            if _reason(exc) in ("storageQuotaExceeded", "quotaExceeded"):
                return StoreError(f"Google Drive is full while {doing}; free space in that Drive or ask an admin.")
            return StoreError(
                f"Google Drive denied access while {doing} in {self.description}; check that the account may use "
                "that folder."
            )
        if status == 404:
            return StoreError(
                f"Google Drive found no such file or folder while {doing} in {self.description}; check that the "
                "configured folder exists and that this account may use it."
            )
        if status is not None:
            return StoreError(f"Google Drive answered HTTP {status} while {doing}; the sync will try again later.")
        return StoreError(
            f"Google Drive could not be reached while {doing} ({type(exc).__name__}); the sync will try again later."
        )

    def _retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, HttpAccessTokenRefreshError):
            return exc.status in _RETRY_STATUSES
        if isinstance(exc, AccessTokenRefreshError | AuthError | StoreError):
            return False
        status = status_of(exc)
        if status is not None:
            return status in _RETRY_STATUSES or (status == 403 and _reason(exc) in _RATE_LIMIT_REASONS)
        return isinstance(exc, OSError | httplib2.HttpLib2Error)

    def _backoff(self, attempt: int, exc: BaseException, doing: str) -> None:
        error = http_error(exc)
        delay = self.backoff_base_seconds * (2**attempt) * (0.5 + random.random() / 2)
        if error is not None and error.resp.get("retry-after", "").isdigit():
            delay = float(error.resp["retry-after"])
        delay = min(delay, self.backoff_max_seconds)
        log.warning(
            "Google Drive failed while %s for %s (%s); retry %d in %.1f s",
            doing,
            self.user,
            status_of(exc) or type(exc).__name__,
            attempt + 1,
            delay,
        )
        time.sleep(delay)

    def __call__(self, doing: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with a fresh token, retrying what Drive says may be retried; failures become StoreError."""
        attempt = 0
        while True:
            try:
                self.auth.ensure_fresh()
                return fn()
            except Exception as e:
                if attempt < self.max_retries and self._retryable(e):
                    self._backoff(attempt, e, doing)
                    attempt += 1
                    continue
                log.info("Google Drive call failed while %s for %s", doing, self.user, exc_info=True)
                raise self._failure(e, doing) from e
