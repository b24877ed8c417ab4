"""Attack: a pod's server (root there is the user) lies to the backup that reads it through the contents API.

The hostile server is a real HTTP server on loopback speaking the contents API, the store a real S3 server
(moto_server). It lists a file as 10 bytes and streams hundreds of MiB; lists more than a backup may read; answers
a listing larger than any honest folder. The backup must stop at what was listed, refuse the rest with a sentence,
and never fill the hub's temporary folder.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from dolab_services.sync.contents import RemoteError, RemoteServer
from dolab_services.sync.engine import SyncEngine
from dolab_services.sync.remote import backup_remote
from dolab_services.sync.s3 import S3Store

from ..sync.conftest import S3Server, s3_server  # noqa: F401 (the session fixture)

MiB = 1 << 20


class Hostile:
    """What the hostile server lists and sends, and how much it managed to send."""

    def __init__(self) -> None:
        self.listing: list[dict[str, Any]] = []
        self.listing_padding = 0
        self.stream_bytes = 0
        self.sent = 0
        self.lock = threading.Lock()


@pytest.fixture
def hostile() -> Iterator[tuple[Hostile, str]]:
    state = Hostile()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if "/api/contents" in path:
                model = {"type": "directory", "name": "", "path": "", "content": state.listing}
                body = json.dumps({**model, "padding": "x" * state.listing_padding}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            # files/<path>: far more than listed, as fast as the client takes it.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(state.stream_bytes))
            self.end_headers()
            block = b"\0" * MiB
            try:
                for _ in range(state.stream_bytes // MiB):
                    self.wfile.write(block)
                    with state.lock:
                        state.sent += len(block)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield state, f"http://127.0.0.1:{httpd.server_address[1]}/user/mallory/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def store(s3_server: S3Server) -> S3Store:  # noqa: F811
    return s3_server.store(s3_server.new_bucket(), "backups/mallory")


def entry(name: str, size: int) -> dict[str, Any]:
    return {"name": name, "path": name, "type": "file", "size": size, "last_modified": "2026-12-01T10:00:00Z"}


def test_a_file_listed_small_and_streamed_huge_is_cut_at_its_listed_size(
    hostile: tuple[Hostile, str], store: S3Store
) -> None:
    state, url = hostile
    state.listing = [entry("notes.txt", 10)]
    state.stream_bytes = 300 * MiB
    report = backup_remote(SyncEngine(store), RemoteServer(url, "t"))
    skipped = dict(report.skipped)
    assert "sent more than the 10 bytes it listed" in skipped["notes.txt"]
    # Three reads, each given up after its first chunk: a few MiB crossed the socket, never hundreds.
    assert state.sent < 40 * MiB, state.sent


@pytest.mark.parametrize(
    "attack, words",
    [
        pytest.param(
            lambda s: setattr(s, "listing", [entry(f"f{i}.bin", 600 * 1024) for i in range(3)]),
            "GiB of changed files, more than the",
            id="lists-more-than-a-backup-reads",
        ),
        pytest.param(
            lambda s: (setattr(s, "listing", [entry("a.txt", 1)]), setattr(s, "listing_padding", 2 * MiB)),
            "larger than 1 MiB",
            id="listing-too-large",
        ),
        pytest.param(
            lambda s: setattr(s, "listing", [entry(f"f{i}", 1) for i in range(50)]),
            "more than 20 files and folders",
            id="too-many-entries",
        ),
    ],
)
def test_what_no_honest_workspace_lists_is_refused_with_a_sentence(
    hostile: tuple[Hostile, str], store: S3Store, attack: Callable[[Hostile], object], words: str
) -> None:
    state, url = hostile
    attack(state)
    state.stream_bytes = 600 * 1024
    server = RemoteServer(url, "t", max_read_bytes=MiB, max_listing_bytes=MiB, max_entries=20)
    with pytest.raises(RemoteError, match=words) as caught:
        backup_remote(SyncEngine(store), server)
    assert "Error" not in str(caught.value)
    assert state.sent == 0  # refused before a byte of content was read
    assert SyncEngine(store).snapshots() == []
