"""What users see when the identity provider fails: an error page with a sentence, never a 500."""

from __future__ import annotations

from tornado import web
from tornado.httpclient import HTTPClientError

__all__ = ["ProviderError", "provider_error"]


class ProviderError(web.HTTPError):
    """The identity provider could not be reached or answered something unusable.

    A ``tornado.web.HTTPError``, so the hub renders its error page with the sentence (502 or 503).
    """

    def __init__(self, status_code: int, message: str) -> None:
        # The message is a sentence for users; it holds no tokens or provider replies (those go to the log only).
        super().__init__(status_code, message)
        self.sentence = message


def provider_error(provider: str, what: str, exc: BaseException) -> ProviderError:
    """Turn a failed request to the provider into the sentence a user sees.

    ``provider`` names it for people ("the identity provider at https://login.example.org"), ``what`` is the step
    ("signing you in", "reading its OpenID configuration").
    """
    if isinstance(exc, HTTPClientError) and exc.code != 599:
        if 400 <= exc.code < 500:
            return ProviderError(
                502,
                f"{provider} refused the request while {what} (HTTP {exc.code}). Please sign in again; "
                "if it keeps happening, tell an administrator.",
            )
        return ProviderError(
            502,
            f"{provider} answered with an error (HTTP {exc.code}) while {what}. Please try again in a few "
            "minutes; if it keeps happening, tell an administrator.",
        )
    if isinstance(exc, (HTTPClientError, OSError, TimeoutError)):
        return ProviderError(
            503,
            f"{provider} could not be reached while {what}. Please try again in a few minutes; "
            "if it keeps happening, tell an administrator.",
        )
    return ProviderError(
        502,
        f"{provider} answered something DO-LAB could not read while {what}. Please try again in a few "
        "minutes; if it keeps happening, tell an administrator.",
    )
