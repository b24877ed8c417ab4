"""A small async client of the JupyterHub REST API, shared by DO-LAB's services (reaper; culler, monitor, sync).

API::

    hub = HubClient(api_url=None, token=None, *, concurrency=4, page_size=200,
                    connect_timeout_seconds=10, request_timeout_seconds=30)
    async with hub:                                       # or call hub.close() when done
        async for user in hub.users(state="active"):     # every page; None: every user
            ...                                           # servers carry "state" with admin:server_state
        model = await hub.request("GET", "/users/alice")  # decoded JSON; None for an empty answer (204)
        await hub.request("POST", "/users/alice/activity", {"last_activity": "..."})

``api_url`` and ``token`` default to ``$JUPYTERHUB_API_URL`` and ``$JUPYTERHUB_API_TOKEN``, which the hub sets for
its managed services; paths are relative to ``api_url`` (``.../hub/api``). At most ``concurrency`` requests are in
flight at once. Every failure raises :class:`HubAPIError` with ``status`` (the HTTP status, 0 when the hub did
not answer) and a one-sentence message; the token is never logged nor put in a message.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

__all__ = ["PAGINATION_MEDIA_TYPE", "HubAPIError", "HubClient"]

PAGINATION_MEDIA_TYPE = "application/jupyterhub-pagination+json"
_BODY_METHODS = {"POST", "PUT", "PATCH"}


class HubAPIError(Exception):
    """The hub refused a request or did not answer; ``status`` is the HTTP status, 0 when there was no answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HubClient:
    """The hub's REST API for one service, with timeouts, pagination and a cap on concurrent requests."""

    def __init__(
        self,
        api_url: str | None = None,
        token: str | None = None,
        *,
        concurrency: int = 4,
        page_size: int = 200,
        connect_timeout_seconds: float = 10,
        request_timeout_seconds: float = 30,
    ) -> None:
        api_url = api_url or os.environ.get("JUPYTERHUB_API_URL", "")
        token = token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
        if not api_url:
            raise ValueError("No hub API URL: set JUPYTERHUB_API_URL (the hub sets it for its services).")
        if not token:
            raise ValueError("No API token: set JUPYTERHUB_API_TOKEN (the hub sets it for its services).")
        if concurrency < 1 or page_size < 1:
            raise ValueError("concurrency and page_size must be at least 1.")
        self.api_url = api_url.rstrip("/")
        self.concurrency = concurrency
        self.page_size = page_size
        self.connect_timeout_seconds = connect_timeout_seconds
        self.request_timeout_seconds = request_timeout_seconds
        self._token = token
        self._semaphore = asyncio.Semaphore(concurrency)
        self._http: AsyncHTTPClient | None = None

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections (a later request opens new ones)."""
        if self._http is not None:
            self._http.close()
            self._http = None

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """``method path`` (relative to the API URL, query included) with ``body`` as JSON; the decoded answer."""
        return await self._fetch(method, path, body, accept="application/json")

    async def users(self, state: str | None = "active") -> AsyncIterator[dict[str, Any]]:
        """Every user model (``state``: "active", "ready", "inactive" or None for all), page by page.

        Pages follow ``_pagination.next``'s offset and limit on our own API URL, never its ``url``: the hub builds
        that from the request's Host header, which may not reach it (and the token must not go elsewhere).
        """
        offset, limit = 0, self.page_size
        while True:
            query: dict[str, Any] = {"offset": offset, "limit": limit}
            if state:
                query["state"] = state
            data = await self._fetch("GET", "/users?" + urlencode(query), None, accept=PAGINATION_MEDIA_TYPE)
            if isinstance(data, list):  # a hub that ignores the pagination media type sends everything at once
                for user in data:
                    if isinstance(user, dict):
                        yield user
                return
            if not isinstance(data, dict) or not isinstance(data.get("items"), list):
                raise HubAPIError(200, f"The answer to GET {self.api_url}/users is not a JupyterHub user list.")
            for user in data["items"]:
                if isinstance(user, dict):
                    yield user
            following = (data.get("_pagination") or {}).get("next")
            if not isinstance(following, dict):
                return
            try:
                next_offset, limit = int(following["offset"]), int(following.get("limit", limit))
            except (KeyError, TypeError, ValueError):
                raise HubAPIError(200, "The hub's _pagination.next has no usable offset and limit.") from None
            if next_offset <= offset:  # a page that does not move on would loop forever
                raise HubAPIError(200, f"The hub's next page does not move on (offset {next_offset} after {offset}).")
            offset = next_offset

    async def _fetch(self, method: str, path: str, body: Any, accept: str) -> Any:
        method = method.upper()
        url = f"{self.api_url}/{path.lstrip('/')}"
        where = f"{method} {url.split('?')[0]}"
        request = HTTPRequest(
            url,
            method=method,
            headers={"Authorization": f"token {self._token}", "Accept": accept, "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else ("" if method in _BODY_METHODS else None),
            allow_nonstandard_methods=body is not None and method not in _BODY_METHODS,
            connect_timeout=self.connect_timeout_seconds,
            request_timeout=self.request_timeout_seconds,
            follow_redirects=False,  # a redirect would carry the token to wherever it points
        )
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True, max_clients=self.concurrency)
        async with self._semaphore:
            try:
                response = await self._http.fetch(request, raise_error=False)
            except HTTPClientError as e:  # 599: timeouts and dropped connections
                raise HubAPIError(0, f"The hub did not answer {where} ({e.message or e}).") from None
            except OSError as e:
                raise HubAPIError(0, f"The hub did not answer {where} ({e.strerror or e}).") from None
        code = response.code
        if code == 599:
            raise HubAPIError(0, f"The hub did not answer {where} ({response.error}).")
        if code in (401, 403):
            raise HubAPIError(
                code, f"The hub refused {where} (HTTP {code}): the token is unknown or lacks a scope this needs."
            )
        text = response.body.decode(errors="replace") if response.body else ""
        if 300 <= code < 400:
            raise HubAPIError(code, f"The hub redirected {where} (HTTP {code}): check the API URL.")
        if code >= 400:
            try:
                reason = str(json.loads(text).get("message") or "")
            except (ValueError, AttributeError):
                reason = ""
            raise HubAPIError(code, f"The hub answered HTTP {code} to {where}{': ' + reason if reason else ''}.")
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise HubAPIError(code, f"The answer to {where} is not JSON: is {self.api_url} a JupyterHub API?") from None
