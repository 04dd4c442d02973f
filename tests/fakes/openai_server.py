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
`stream_options.include_usage`, then `data: [DONE]`. Tokens are words (`usage`
counts the prompt's and the answer's); a request's `max_tokens` (or
`max_completion_tokens`) cuts the answer to that many words, with `finish_reason`
"length", as the real API does.

Accounting and rate limits: every request the server answers from the queue is logged
in `served` (arrival time, tokens, status); `tokens_served` is their total,
`per_minute()` the requests and tokens of each minute since the first, and
`busiest_minute()` the most requests and the most tokens any 60 s held. `limit(rpm=,
tpm=)` enforces limits the way OpenAI does: every answer carries
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (resets as Go durations: `1s`,
`6m0s`, `12ms`, the time until the limit is back to full), and a request that would take
the last 60 s over either limit gets a 429 (`code` "rate_limit_exceeded", `type`
"requests" or "tokens", OpenAI's message with Limit / Used / Requested and "Please try
again in ...") with `retry-after` in whole seconds, logged in `refused`, and leaves the
queue as it was. One simplification: OpenAI charges a request its estimate (prompt
characters and `max_tokens`) as it arrives; this server charges it the tokens it serves.
"""

from __future__ import annotations

import dataclasses
import json
import math
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


@dataclass(frozen=True)
class Served:
    """One request the server answered from its queue (rate-limit 429s are in `refused`)."""

    at: float  # time.time() on arrival
    tokens: int  # the usage it reported (0 for a scripted failure)
    status: int


@dataclass(frozen=True)
class Refused:
    """One request the server's own rate limit refused with a 429."""

    at: float
    kind: str  # "requests" or "tokens"
    tokens: int
    retry_after: float  # seconds until it would have fitted


def go_duration(seconds: float) -> str:
    """`seconds` as OpenAI writes its resets: `12ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"


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


def _max_tokens(request: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def capped(request: dict[str, Any], behaviour: Respond) -> Respond:
    """The answer as the request's `max_tokens` lets it be (words are tokens)."""
    most = _max_tokens(request)
    words = behaviour.text.split()
    if most is None or behaviour.usage is not None or len(words) <= most:
        return behaviour
    return dataclasses.replace(behaviour, text=" ".join(words[:most]), finish_reason="length")


def usage_of(request: dict[str, Any], behaviour: Respond) -> dict[str, int]:
    if behaviour.usage is not None:
        return behaviour.usage
    prompt, completion = _words(request.get("messages")), len(behaviour.text.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.connections = 0  # TCP connections accepted so far
        # Streams whose client closed the connection early: the text chunk it was at.
        self.hangups: list[int] = []
        self.served: list[Served] = []
        self.refused: list[Refused] = []
        self.rpm = 0  # enforced limits (0: none), over the last `window` seconds
        self.tpm = 0
        self.window = 60.0
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

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- rate limits and accounting

    def limit(self, *, rpm: int = 0, tpm: int = 0, window: float = 60.0) -> None:
        """Enforce `rpm` requests and `tpm` tokens per `window` seconds (0: no limit), as
        OpenAI does (see the module docstring)."""
        with self._lock:
            self.rpm, self.tpm, self.window = rpm, tpm, window

    @property
    def tokens_served(self) -> int:
        """Every token of every answer served so far (prompt and answer)."""
        with self._lock:
            return sum(s.tokens for s in self.served)

    def per_minute(self) -> list[tuple[int, int]]:
        """(requests, tokens) of each minute since the first request served."""
        with self._lock:
            served = sorted(self.served, key=lambda s: s.at)
        if not served:
            return []
        minutes = [(0, 0)] * (int((served[-1].at - served[0].at) // 60) + 1)
        for s in served:
            i = int((s.at - served[0].at) // 60)
            minutes[i] = (minutes[i][0] + 1, minutes[i][1] + s.tokens)
        return minutes

    def busiest_minute(self, seconds: float = 60.0) -> tuple[int, int]:
        """The most requests, and the most tokens, served within any `seconds`."""
        with self._lock:
            served = sorted(self.served, key=lambda s: s.at)
        most_requests = most_tokens = tokens = start = 0
        for end, s in enumerate(served):
            tokens += s.tokens
            while s.at - served[start].at >= seconds:
                tokens -= served[start].tokens
                start += 1
            most_requests = max(most_requests, end - start + 1)
            most_tokens = max(most_tokens, tokens)
        return most_requests, most_tokens

    def _admit(self, request: dict[str, Any], behaviour: Behaviour
               ) -> tuple[dict[str, str], tuple[dict[str, str], Any] | None]:
        """Under the lock: the rate-limit headers of this answer, and the 429 (headers,
        body) when the request does not fit; a request that fits is logged as served."""
        now = time.time()
        tokens = (usage_of(request, capped(request, behaviour))["total_tokens"]
                  if isinstance(behaviour, Respond) else 0)
        recent = [s for s in self.served if now - s.at < self.window]
        used_tokens = sum(s.tokens for s in recent)
        refusal = None
        if self.rpm and len(recent) + 1 > self.rpm:
            oldest = sorted(recent, key=lambda s: s.at)[len(recent) - self.rpm]
            refusal = self._refusal(request, "requests", now, oldest.at + self.window - now,
                                    len(recent), 1)
        elif self.tpm and used_tokens + tokens > self.tpm:
            wait, freed = self.window, 0
            for s in sorted(recent, key=lambda s: s.at):
                freed += s.tokens
                if freed >= used_tokens + tokens - self.tpm:
                    wait = s.at + self.window - now
                    break
            refusal = self._refusal(request, "tokens", now, wait, used_tokens, tokens)
        if refusal is None:
            self.served.append(Served(now, tokens, behaviour.status if isinstance(
                behaviour, Fail) else 200))
            recent.append(self.served[-1])
            used_tokens += tokens
        headers = self._limit_headers(now, recent, used_tokens)
        if refusal is not None:
            refusal[0].update(headers)
        return headers, refusal

    def _refusal(self, request: dict[str, Any], kind: str, now: float, wait: float,
                 used: int, requested: int) -> tuple[dict[str, str], Any]:
        limit = self.rpm if kind == "requests" else self.tpm
        model = request.get("model") or "fake"
        label = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        visit = "Visit https://platform.openai.com/account/rate-limits to learn more."
        if kind == "tokens" and requested > limit:
            message = (f"Request too large for {model} in organization org-fake on {label}: "
                       f"Limit {limit}, Requested {requested}. The input or output tokens "
                       f"must be reduced in order to run successfully. {visit}")
            headers: dict[str, str] = {}
        else:
            message = (f"Rate limit reached for {model} in organization org-fake on {label}: "
                       f"Limit {limit}, Used {used}, Requested {requested}. Please try again "
                       f"in {go_duration(max(wait, 0.001))}. {visit}")
            headers = {"retry-after": str(max(1, math.ceil(wait)))}
        self.refused.append(Refused(now, kind, requested, max(wait, 0.0)))
        return headers, {"error": {"message": message, "type": kind, "param": None,
                                   "code": "rate_limit_exceeded"}}

    def _limit_headers(self, now: float, recent: list[Served], used_tokens: int
                       ) -> dict[str, str]:
        if not (self.rpm or self.tpm):
            return {}
        reset = max((s.at + self.window - now for s in recent), default=0.0)
        token_reset = max((s.at + self.window - now for s in recent if s.tokens), default=0.0)
        headers: dict[str, str] = {}
        if self.rpm:
            headers |= {"x-ratelimit-limit-requests": str(self.rpm),
                        "x-ratelimit-remaining-requests": str(max(0, self.rpm - len(recent))),
                        "x-ratelimit-reset-requests": go_duration(max(reset, 0.0))}
        if self.tpm:
            headers |= {"x-ratelimit-limit-tokens": str(self.tpm),
                        "x-ratelimit-remaining-tokens": str(max(0, self.tpm - used_tokens)),
                        "x-ratelimit-reset-tokens": go_duration(max(token_reset, 0.0))}
        return headers

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

    def _start_events(self, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
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
        request = body if isinstance(body, dict) else {}
        owner = self.owner
        with owner._lock:  # the queue's head and the limits, decided at once
            behaviour = owner._queue[0] if owner._queue else None
            if behaviour is not None:
                headers, refusal = owner._admit(request, behaviour)
                if refusal is None:
                    owner._queue.popleft()
        if behaviour is None:
            self._send_json(500, {"error": {"message": "fake server: no behaviour queued",
                                            "type": "server_error", "code": None}})
            return
        if refusal is not None:
            self._send_json(429, refusal[1], refusal[0])
            return
        if isinstance(behaviour, Fail):
            self.owner._sleep(behaviour.delay)
            error = behaviour.body if behaviour.body is not None else {
                "error": {"message": f"fake error {behaviour.status}", "type": "server_error",
                          "code": None}}
            self._send_json(behaviour.status, error, {**headers, **behaviour.headers})
        elif isinstance(behaviour, StreamError):
            self._start_events(headers)
            self._event(self._chunk(request, None, {"role": "assistant", "content": ""}, None))
            self._event(self._chunk(request, None, {"content": behaviour.text}, None))
            self._event({"error": behaviour.error})
        elif request.get("stream"):
            self._stream(request, capped(request, behaviour), headers)
        else:
            self._complete(request, capped(request, behaviour), headers)

    def _usage(self, request: dict[str, Any], behaviour: Respond) -> dict[str, int]:
        return usage_of(request, behaviour)

    def _chunk(self, request: dict[str, Any], behaviour: Respond | None, delta: dict[str, Any],
               finish_reason: str | None, *, cid: str = "chatcmpl-fake-stream"
               ) -> dict[str, Any]:
        model = (behaviour.model if behaviour else None) or request.get("model") or "fake"
        return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]}

    def _complete(self, request: dict[str, Any], behaviour: Respond,
                  headers: dict[str, str]) -> None:
        self.owner._sleep(behaviour.delay)
        self._send_json(200, {
            "id": self.owner._next_id(), "object": "chat.completion", "created": int(time.time()),
            "model": behaviour.model or request.get("model") or "fake",
            "choices": [{"index": 0, "logprobs": None, "finish_reason": behaviour.finish_reason,
                         "message": {"role": "assistant", "content": behaviour.text,
                                     "refusal": None}}],
            "usage": self._usage(request, behaviour),
        }, headers)

    def _stream(self, request: dict[str, Any], behaviour: Respond,
                headers: dict[str, str]) -> None:
        self.owner._sleep(behaviour.delay)
        cid = self.owner._next_id()
        self._start_events(headers)
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
