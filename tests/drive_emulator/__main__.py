"""Run the Google Drive emulator: ``python -m tests.drive_emulator [--host 127.0.0.1] [--port 0]``.

Prints ``DRIVE_EMULATOR_READY <url>`` on stdout once it listens, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from .server import make_app

#: Chunks and multipart bodies up to this size are accepted (Drive's own cap is far larger).
MAX_BODY_BYTES = 1024 * 1024 * 1024


async def serve(host: str, port: int) -> None:
    """Listen on host:port (0: a free port) until a stop signal."""
    sockets = bind_sockets(port, host)
    server = HTTPServer(make_app(), max_body_size=MAX_BODY_BYTES, max_buffer_size=MAX_BODY_BYTES)
    server.add_sockets(sockets)
    bound = sockets[0].getsockname()[1]
    print(f"DRIVE_EMULATOR_READY http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()


def main(argv: list[str] | None = None) -> None:
    """Parse flags and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("::1", "localhost"):
        sys.exit("The Drive emulator listens on loopback only.")
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
