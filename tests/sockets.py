"""A Realtime client socket to the stand-ins' gateway, as supabase-js opens one."""

from __future__ import annotations

import json
from typing import Any

from websockets.sync.client import ClientConnection, connect
from websockets.sync.connection import Connection

from tests.fakes.gateway import StandIns


def realtime_socket(s: StandIns, key: str, vsn: str = "2.0.0") -> ClientConnection:
    ws_url = s.url.replace("http://", "ws://") + f"/realtime/v1/websocket?apikey={key}&vsn={vsn}"
    return connect(ws_url, open_timeout=10)


def decode(frame: str | bytes) -> list[Any]:
    """A vsn 2.0.0 frame as realtime-js' Serializer reads it: Phoenix's array, or a binary
    user broadcast (kind 4: sizes of topic, event and meta, the payload's encoding, then
    the four) as [None, None, topic, "broadcast", {type, event, payload[, meta]}]."""
    if isinstance(frame, str):
        return list(json.loads(frame))
    assert frame[0] == 4, f"not a user broadcast: kind {frame[0]}"
    topic_size, event_size, meta_size, encoding = frame[1:5]
    at = 5
    topic, at = frame[at:at + topic_size].decode(), at + topic_size
    event, at = frame[at:at + event_size].decode(), at + event_size
    meta, body = frame[at:at + meta_size], frame[at + meta_size:]
    message: dict[str, Any] = {"type": "broadcast", "event": event,
                               "payload": json.loads(body) if encoding == 1 else body}
    if meta_size:
        message["meta"] = json.loads(meta)
    return [None, None, topic, "broadcast", message]


def receive(ws: Connection, event: str) -> list[Any]:
    """The next message of `event` (Phoenix's array form), skipping others."""
    while True:
        msg = decode(ws.recv(timeout=10))
        if msg[3] == event:
            return msg
