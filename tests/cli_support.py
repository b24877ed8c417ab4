"""What the ``dolab`` command's tests share: a clean environment, GPUs to list, and a small real HTTP server on
127.0.0.1 playing the hub.

Each test module wraps these in its own fixtures (``clean_env``, ``hub``, ``closed_url``), so that importing
them needs no fixture re-export.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from dolab_spawner.slots import GpuSlot

A100_0 = GpuSlot(0, "GPU-aaaa", "NVIDIA A100-SXM4-80GB", 80.0)
A100_1 = GpuSlot(1, "GPU-bbbb", "NVIDIA A100-SXM4-80GB", 80.0)
REMOTE = GpuSlot(0, "GPU-cccc", "NVIDIA H100 80GB HBM3", 79.6, host="node2")
INVENTORY = [A100_0, A100_1]
INVENTORY_JSON = json.dumps([s.to_dict() for s in INVENTORY])


def isolate_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No DO-LAB, hub, RunPod or proxy variables from the outside; a private data dir; no docker engine."""
    for name in list(os.environ):
        if name.startswith(("DOLAB_", "RUNPOD_", "JUPYTERHUB_")) or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("DOLAB_DATA_DIR", str(data_dir))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    return data_dir


# ----- a hub on 127.0.0.1 ----------------------------------------------------------------------------------


class FakeHub:
    """A real HTTP server on 127.0.0.1 answering through ``respond(path, query)``; it records every request."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[dict[str, Any]] = []
        self.respond: Callable[[str, dict[str, list[str]]], tuple[int, Any]] = lambda path, query: (404, {})


@contextmanager
def serve_fake_hub() -> Iterator[FakeHub]:
    """A :class:`FakeHub` listening on a free port until the block ends."""
    fake = FakeHub()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            fake.requests.append({"path": parts.path, "query": query, "headers": dict(self.headers)})
            status, body = fake.respond(parts.path, query)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if isinstance(body, bytes) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first (the timeout tests)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()


def unused_url() -> str:
    """A 127.0.0.1 URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
