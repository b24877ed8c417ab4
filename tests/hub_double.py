"""The hub double for the services' and the ``dolab`` command's tests: a real HTTP server on 127.0.0.1 answering
every method through ``respond(method, path, query, body)``, recording each request (method, path, query, headers
and JSON body) and how many were in flight at once.

An answer is JSON, or ``bytes`` sent as they are (as ``text/html``: a page that is no hub's), or ``None`` for an
empty body. A client that gives up before the answer (the timeout tests) is no error.

``users_api(users, page_size)`` answers ``GET /hub/api/users`` (paginated, with a ``next.url`` on another host that
clients must not follow) and ``GET /hub/api/users/:name`` from a list of user models.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

Responder = Callable[[str, str, dict[str, list[str]], Any], tuple[int, Any]]


@dataclass
class HubDouble:
    """The server's URL (``url``; the API is at ``api_url``), its answers and what it saw."""

    url: str = ""
    respond: Responder = lambda method, path, query, body: (404, {"status": 404, "message": "Not found"})
    delay_seconds: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def api_url(self) -> str:
        return f"{self.url}/hub/api"


@contextmanager
def serve_hub_double() -> Iterator[HubDouble]:
    """A :class:`HubDouble` listening on a free port until the block ends."""
    hub = HubDouble()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            with hub.lock:
                hub.in_flight += 1
                hub.max_in_flight = max(hub.max_in_flight, hub.in_flight)
                hub.requests.append(
                    {
                        "method": self.command,
                        "path": parts.path,
                        "query": parse_qs(parts.query),
                        "headers": dict(self.headers),
                        "body": body,
                    }
                )
            try:
                if hub.delay_seconds:
                    threading.Event().wait(hub.delay_seconds)
                status, answer = hub.respond(self.command, parts.path, parse_qs(parts.query), body)
            finally:
                with hub.lock:
                    hub.in_flight -= 1
            data = answer if isinstance(answer, bytes) else (b"" if answer is None else json.dumps(answer).encode())
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if isinstance(answer, bytes) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first (the timeout tests)

        do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _handle

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield hub
    finally:
        httpd.shutdown()
        httpd.server_close()


def users_api(users: Sequence[dict[str, Any]], page_size: int = 1) -> Responder:
    """Answers for ``/hub/api/users`` (every user, ``page_size`` a page) and ``/hub/api/users/:name``."""

    def respond(method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/hub/api/users":
            offset = int(query.get("offset", ["0"])[0])
            limit = min(int(query.get("limit", [str(page_size)])[0]), page_size)
            following = None
            if offset + limit < len(users):
                url = f"http://elsewhere.invalid/hub/api/users?offset={offset + limit}&limit={limit}"
                following = {"offset": offset + limit, "limit": limit, "url": url}
            pagination = {"offset": offset, "limit": limit, "total": len(users), "next": following}
            return 200, {"items": list(users[offset : offset + limit]), "_pagination": pagination}
        if method == "GET" and path.startswith("/hub/api/users/"):
            name = unquote(path.removeprefix("/hub/api/users/"))
            for user in users:
                if user["name"] == name:
                    return 200, user
        return 404, {"status": 404, "message": "Not found"}

    return respond
