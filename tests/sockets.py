"""A Realtime client socket to the stand-ins' gateway, as supabase-js opens one."""

from __future__ import annotations

import json
from typing import Any

from websockets.sync.client import ClientConnection, connect
from websockets.sync.connection import Connection

from tests.fakes.gateway import StandIns


def realtime_socket(s: StandIns, key: str) -> ClientConnection:
    ws_url = s.url.replace("http://", "ws://") + f"/realtime/v1/websocket?apikey={key}&vsn=2.0.0"
    return connect(ws_url, open_timeout=10)


def receive(ws: Connection, event: str) -> list[Any]:
    """The next message of `event` (Phoenix's array form), skipping others."""
    while True:
        msg = json.loads(ws.recv(timeout=10))
        if msg[3] == event:
            return list(msg)
