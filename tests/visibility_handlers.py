"""The handler tests/acceptance/test_user_visibility.py runs in a real worker: it fails the way real
provider calls fail, with internal addresses and OS errors in the exception's text.

context `kind`: `socket` (a TCP connect to a closed port: ConnectionRefusedError),
`urlopen` (urllib to a closed port: URLError), `timeout` (TimeoutError naming a host),
`wrapped` (a RuntimeError whose text carries a URL, an IP:port and an errno), `openai` (the
OpenAI-compatible handler, whose OPENAI_BASE_URL is a closed port). `port` is the closed
port to use.
"""

from __future__ import annotations

import socket
import urllib.request
from typing import Any

from tasks.handlers import openai_chat

INTERNAL = "10.20.30.40:8080"


def leaky(task: dict[str, Any]) -> Any:
    context = task["request_payload"].get("context") or {}
    kind, port = context.get("kind"), int(context.get("port", 9))
    if kind == "socket":
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    elif kind == "urlopen":
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/chat", timeout=10).close()
    elif kind == "timeout":
        raise TimeoutError(f"timed out reading from {INTERNAL}")
    elif kind == "wrapped":
        raise RuntimeError(f"upstream http://{INTERNAL}/v1/chat said no ([Errno 104] reset by "
                           f"peer at {INTERNAL})")
    elif kind == "openai":
        return openai_chat.handler(task)
    return {"answer": "no failure asked for"}
