"""A scriptable OpenAI-compatible server for tests: `POST /v1/chat/completions`.

Queue what the next requests get, in order, then point the real SDK at `url`::

    with FakeOpenAI() as fake:
        fake.respond("Hello there", chunks=3, delay_per_chunk=0.01)
        fake.fail(429, headers={"Retry-After": "2"})
        ...  # OPENAI_BASE_URL=fake.url
        fake.requests[0].body["messages"]

A request that finds the queue empty gets a 500 saying so. Streaming requests
(`"stream": true`) get server-sent events: a role chunk, one chunk per piece of
text, a chunk with `finish_reason`, a usage chunk when
`stream_options.include_usage`, then `data: [DONE]`.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_COMPLETIONS = "/v1/chat/completions"


@dataclass
class Respond:
    text: str
    chunks: int = 1
    delay_per_chunk: float = 0.0
    delay: float = 0.0
    finish_reason: str | None = "stop"
    model: str | None = None
    usage: dict[str, int] | None = None
    cut_after: int | None = None  # streaming: close after this many text chunks


@dataclass
class Fail:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class StreamError:
    """Stream `text`, then an in-stream `{"error": {...}}` event instead of finishing."""

    text: str
    error: dict[str, Any]


Behaviour = Respond | Fail | StreamError


@dataclass
class RecordedRequest:
    """One request as received; header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


def split_text(text: str, n: int) -> list[str]:
    """`text` cut into `n` non-empty pieces (fewer if it is shorter)."""
    n = max(1, min(n, len(text))) if text else 1
    size, extra = divmod(len(text), n)
    pieces, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        pieces.append(text[start:end])
        start = end
    return [p for p in pieces if p] or [""]


def _words(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.connections = 0  # TCP connections accepted so far
        # Streams whose client closed the connection early: the text chunk it was at.
        self.hangups: list[int] = []
        self._queue: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ids = 0

    # -- scripting

    def respond(self, text: str, *, chunks: int = 1, delay_per_chunk: float = 0.0,
                delay: float = 0.0, finish_reason: str | None = "stop",
                model: str | None = None, usage: dict[str, int] | None = None,
                cut_after: int | None = None) -> None:
        """Answer `text` (in `chunks` SSE pieces when streaming). `model` defaults to the
        requested one; `usage` to word counts; `delay` holds the response headers back."""
        self._push(Respond(text, chunks, delay_per_chunk, delay, finish_reason, model, usage,
                           cut_after))

    def fail(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
             *, delay: float = 0.0) -> None:
        """Answer with HTTP `status`, a JSON `body` (a default error if None) and `headers`."""
        self._push(Fail(status, body, dict(headers or {}), delay))

    def stream_error(self, text: str, error: dict[str, Any]) -> None:
        self._push(StreamError(text, error))

    def _push(self, behaviour: Behaviour) -> None:
        with self._lock:
            self._queue.append(behaviour)

    def _next(self) -> Behaviour | None:
        with self._lock:
            return self._queue.popleft() if self._queue else None

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- lifecycle

    @property
    def url(self) -> str:
        """The base URL to give the SDK (…/v1)."""
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> str:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name="fake-openai", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAI:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def _next_id(self) -> str:
        with self._lock:
            self._ids += 1
            return f"chatcmpl-fake-{self._ids}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: twenty clients connecting at once overflow it
    # and some get their connection reset. A real API server's backlog is far larger.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout tests) makes writes fail: not news.
        pass


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:  # once per connection (it may carry several requests)
        super().setup()
        with self.owner._lock:
            self.owner.connections += 1

    # -- plumbing

    def _headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)
        self.wfile.flush()

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the end of the body is the end of the stream
        self.end_headers()
        self.close_connection = True

    def _client_gone(self) -> bool:
        """The client has closed the connection (an EOF is waiting to be read)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return True

    def _event(self, data: Any) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        self.wfile.write(f"data: {text}\n\n".encode())
        self.wfile.flush()

    # -- requests

    def do_GET(self) -> None:
        self.owner.requests.append(RecordedRequest("GET", self.path, self._headers(), None))
        self._send_json(404, {"error": {"message": f"no route {self.path}",
                                        "type": "invalid_request_error", "code": None}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        self.owner.requests.append(RecordedRequest("POST", self.path, self._headers(), body))
        if self.path.split("?")[0] != _COMPLETIONS:
            self._send_json(404, {"error": {"message": f"no route {self.path}",
                                            "type": "invalid_request_error", "code": None}})
            return
        behaviour = self.owner._next()
        if behaviour is None:
            self._send_json(500, {"error": {"message": "fake server: no behaviour queued",
                                            "type": "server_error", "code": None}})
            return
        request = body if isinstance(body, dict) else {}
        if isinstance(behaviour, Fail):
            self.owner._sleep(behaviour.delay)
            error = behaviour.body if behaviour.body is not None else {
                "error": {"message": f"fake error {behaviour.status}", "type": "server_error",
                          "code": None}}
            self._send_json(behaviour.status, error, behaviour.headers)
        elif isinstance(behaviour, StreamError):
            self._start_events()
            self._event(self._chunk(request, None, {"role": "assistant", "content": ""}, None))
            self._event(self._chunk(request, None, {"content": behaviour.text}, None))
            self._event({"error": behaviour.error})
        elif request.get("stream"):
            self._stream(request, behaviour)
        else:
            self._complete(request, behaviour)

    def _usage(self, request: dict[str, Any], behaviour: Respond) -> dict[str, int]:
        if behaviour.usage is not None:
            return behaviour.usage
        prompt, completion = _words(request.get("messages")), len(behaviour.text.split())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _chunk(self, request: dict[str, Any], behaviour: Respond | None, delta: dict[str, Any],
               finish_reason: str | None, *, cid: str = "chatcmpl-fake-stream"
               ) -> dict[str, Any]:
        model = (behaviour.model if behaviour else None) or request.get("model") or "fake"
        return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]}

    def _complete(self, request: dict[str, Any], behaviour: Respond) -> None:
        self.owner._sleep(behaviour.delay)
        self._send_json(200, {
            "id": self.owner._next_id(), "object": "chat.completion", "created": int(time.time()),
            "model": behaviour.model or request.get("model") or "fake",
            "choices": [{"index": 0, "logprobs": None, "finish_reason": behaviour.finish_reason,
                         "message": {"role": "assistant", "content": behaviour.text,
                                     "refusal": None}}],
            "usage": self._usage(request, behaviour),
        })

    def _stream(self, request: dict[str, Any], behaviour: Respond) -> None:
        self.owner._sleep(behaviour.delay)
        cid = self.owner._next_id()
        self._start_events()
        self._event(self._chunk(request, behaviour, {"role": "assistant", "content": ""}, None,
                                cid=cid))
        for i, piece in enumerate(split_text(behaviour.text, behaviour.chunks)):
            if behaviour.cut_after is not None and i >= behaviour.cut_after:
                return  # the connection closes: a stream cut short
            if i:
                self.owner._sleep(behaviour.delay_per_chunk)
            if self._client_gone():
                self.owner.hangups.append(i)
                return
            self._event(self._chunk(request, behaviour, {"content": piece}, None, cid=cid))
        self._event(self._chunk(request, behaviour, {}, behaviour.finish_reason, cid=cid))
        options = request.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage = self._chunk(request, behaviour, {}, None, cid=cid)
            usage["choices"] = []
            usage["usage"] = self._usage(request, behaviour)
            self._event(usage)
        self._event("[DONE]")
