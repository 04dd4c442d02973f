"""The limiter's state in Redis: which Redis (the workers' own), the keys of a limiter,
and one call per script (scripts.py). No waiting here: that is the caller's."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis

from tasks.ratelimit import scripts

# A request counts against a window for a minute plus one second: the second covers the
# time between the charge (in Redis) and the request reaching the provider, whose own
# minute starts when the request arrives. Without it, two requests charged 60 s apart
# could reach the provider 59.9 s apart and share one of its minutes.
WINDOW_SECONDS: Final = 61.0
PREFIX: Final = "agent_bridge:ratelimit"
KEY: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,120}$")


@dataclass(frozen=True)
class Window:
    """One sliding window of a key: `scope` "" is the key's own; others ("tenant:<t>",
    "agent:<a>", ...) are windows inside it, charged together with it."""

    scope: str
    rpm: int = 0
    tpm: int = 0


@dataclass(frozen=True)
class Attempt:
    """What one acquire found: charged, or how long until there may be room."""

    charged: bool
    exact_wait: float = 0.0  # seconds: nothing can make room earlier (pause, requests)
    tokens_wait: float = 0.0  # seconds, counting charges as they stand (settles free room)
    why: str = ""  # "paused", or the scope and kind that holds it ("tenant:x requests")

    @property
    def wait(self) -> float:
        return max(self.exact_wait, self.tokens_wait)


def check_key(key: str) -> str:
    if not KEY.match(key):
        raise ValueError(f"rate limit key {key!r} must be 1 to 120 letters, digits, "
                         "'_', '.', ':' or '-'")
    return key


def scope_part(value: str) -> str:
    """A tenant or agent name as a part of a Redis key: as it is when short and plain,
    else a digest (an enterprise_id is any text)."""
    if re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", value):
        return value
    return "sha256-" + hashlib.sha256(value.encode()).hexdigest()[:32]


class Limiter:
    """The Redis keys of one rate-limit key, and the scripts that use them."""

    def __init__(self, key: str, window: float = WINDOW_SECONDS) -> None:
        self.key = check_key(key)
        self.window = window  # seconds a charge counts (tests shorten it)
        self.base = f"{PREFIX}:{{{key}}}"  # one Cluster hash slot for all of the key's

    @property
    def pause_key(self) -> str:
        return f"{self.base}:pause"

    def _window_keys(self, window: Window) -> tuple[str, str]:
        at = f"{self.base}:{window.scope}" if window.scope else self.base
        return f"{at}:permits", f"{at}:tokens"

    def acquire(self, windows: Sequence[Window], permit: str, tokens: int) -> Attempt:
        keys = [self.pause_key]
        args: list[Any] = [permit, tokens, round(self.window * 1000)]
        for window in windows:
            keys += self._window_keys(window)
            args += [window.rpm, window.tpm]
        charged, exact, estimate, why = _script("acquire")(keys=keys, args=args)
        if charged == 1:
            return Attempt(True)
        return Attempt(False, int(exact) / 1000, int(estimate) / 1000,
                       self._describe(windows, _text(why)))

    def settle(self, windows: Sequence[Window], permit: str, tokens: int) -> None:
        _script("settle")(keys=[self._window_keys(w)[1] for w in windows],
                          args=[permit, tokens])

    def pause(self, seconds: float, why: str) -> float:
        """Pause the key for `seconds` (never shortening a longer pause); returns the
        seconds it is now paused for."""
        left = _script("pause")(keys=[self.pause_key],
                                args=[max(1, round(seconds * 1000)), why[:200]])
        return int(left) / 1000

    @staticmethod
    def _describe(windows: Sequence[Window], why: str) -> str:
        kind, _, index = why.partition(":")
        if not index:
            return why
        scope = windows[int(index) - 1].scope
        return f"{scope} {kind}" if scope else kind


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- the connection

_lock = threading.Lock()
_client: redis.Redis[bytes] | None = None
_scripts: dict[str, Any] = {}
_SOURCES: Final = {"acquire": scripts.ACQUIRE, "settle": scripts.SETTLE,
                   "pause": scripts.PAUSE}


def redis_url() -> str:
    """The Redis the workers already use: the broker's when it is a Redis URL, else
    REDIS_URL."""
    from tasks.app import settings  # the worker's settings, read when the worker starts

    broker = settings.broker_url
    return broker if broker.startswith(("redis://", "rediss://", "unix://")) else \
        settings.redis_url


def _script(name: str) -> Any:
    """A registered script (EVALSHA, loading it on NOSCRIPT) on the process's client: one
    per process, shared by its threads (redis-py's pool; it starts afresh after a fork)."""
    global _client
    found = _scripts.get(name)
    if found is not None:
        return found
    with _lock:
        if _client is None:
            _client = redis.Redis.from_url(redis_url(), socket_timeout=10,
                                           socket_connect_timeout=5, health_check_interval=30)
        for script_name, source in _SOURCES.items():
            _scripts.setdefault(script_name, _client.register_script(source))
        return _scripts[name]


def use_redis(url: str | None) -> None:
    """Use the Redis at `url` (None: the workers' own again) from now on: for tests and
    scripts that run outside a worker."""
    global _client
    with _lock:
        old, _client = _client, (None if url is None else redis.Redis.from_url(url))
        _scripts.clear()
        if _client is not None:
            for script_name, source in _SOURCES.items():
                _scripts[script_name] = _client.register_script(source)
    if old is not None:
        old.close()
