"""Run code in a kernel of a real single-user server, through the hub's proxy, as its user would."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import quote

import requests
import websocket

from tests.patience import patience


def run_in_kernel(hub_url: str, user: str, token: str, code: str, server: str = "", timeout: float = 60) -> str:
    """Start a kernel on ``user``'s server, run ``code``, return what it printed, and delete the kernel.

    ``timeout`` is stretched by :func:`patience` (a kernel starts slowly on a small, busy machine).
    """
    timeout = patience(timeout)
    base = f"{hub_url}/user/{quote(user, safe='@~')}/{server + '/' if server else ''}"
    headers = {"Authorization": f"token {token}"}
    reply = requests.post(f"{base}api/kernels", headers=headers, json={}, timeout=timeout)
    reply.raise_for_status()
    kernel_id = reply.json()["id"]
    try:
        ws_url = base.replace("http://", "ws://", 1) + f"api/kernels/{kernel_id}/channels"
        ws = websocket.create_connection(ws_url, header=[f"Authorization: token {token}"], timeout=timeout)
        try:
            return _execute(ws, code, timeout)
        finally:
            ws.close()
    finally:
        requests.delete(f"{base}api/kernels/{kernel_id}", headers=headers, timeout=timeout)


def _execute(ws: websocket.WebSocket, code: str, timeout: float) -> str:
    msg_id = uuid.uuid4().hex
    ws.send(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "username": "e2e",
                    "session": uuid.uuid4().hex,
                    "msg_type": "execute_request",
                    "version": "5.3",
                    "date": datetime.now(timezone.utc).isoformat(),
                },
                "parent_header": {},
                "metadata": {},
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    out: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "stream":
            out.append(msg["content"]["text"])
        elif kind == "error":
            raise RuntimeError("kernel error: " + "\n".join(msg["content"]["traceback"]))
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out)
    raise TimeoutError(f"no result from the kernel in {timeout:.0f} s")
