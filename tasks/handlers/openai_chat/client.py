"""The process's settings and client: read and made on the first task, then shared by
every task and thread of the process (one pool of kept-alive HTTP connections). A forked
child (a prefork pool process) makes its own client."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Final

import openai

from tasks.handlers.openai_chat.settings import Settings

# Most connections one worker process keeps to the API (and keeps alive between
# tasks): enough for a threads worker at -c 1000 to stream every answer at once.
POOL_CONNECTIONS: Final = 1000

_lock = threading.Lock()
_settings: Settings | None = None
_client: openai.OpenAI | None = None  # one per process, shared by all its tasks


def settings() -> Settings:
    """The settings, read from the environment on first use."""
    global _settings
    with _lock:
        if _settings is None:
            _settings = Settings.from_env()
        return _settings


def get_client(current: Settings) -> openai.OpenAI:
    """The process's client: made on first use, then shared by every task (and thread)
    of the process, with one pool of kept-alive HTTP connections. A forked child (a
    prefork pool process) makes its own: connections are never shared across a fork."""
    global _client
    client = _client
    if client is not None:
        return client
    with _lock:
        if _client is None:
            # max_retries=0: retries belong to the runner (Celery, with backoff).
            _client = openai.OpenAI(
                base_url=current.base_url, api_key=current.api_key, timeout=current.timeout,
                max_retries=0, http_client=openai.DefaultHttpxClient(
                    limits=_pool_limits(POOL_CONNECTIONS), timeout=current.timeout))
        return _client


def _pool_limits(size: int) -> Any:
    """`Limits(size, size)` of the HTTP library the installed SDK is built on (httpx, or
    httpx2 in later SDKs): up to `size` connections, all kept alive between requests
    (the SDK's default keeps 100, so a burst of streams would reconnect)."""
    base = next(c for c in openai.DefaultHttpxClient.__mro__ if c.__name__ == "Client")
    module = sys.modules[base.__module__.partition(".")[0]]
    return module.Limits(max_connections=size, max_keepalive_connections=size)


def _forget_client_after_fork() -> None:
    # The child must not use the parent's connections (or a lock another thread held at
    # the fork); it is not closed here, as closing would end the parent's sockets' TLS.
    global _lock, _client
    _lock = threading.Lock()
    _client = None


os.register_at_fork(after_in_child=_forget_client_after_fork)


def reset_settings() -> None:
    """Forget the cached settings and client; the next task reads the environment again."""
    global _settings, _client
    with _lock:
        client, _settings, _client = _client, None, None
    if client is not None:
        client.close()
