"""A handler that answers with any OpenAI-compatible chat-completions API.

Enable it with ``AGENT_HANDLER=tasks.handlers.openai_chat:handler`` (needs
``pip install "agent-bridge[openai]"``). It works against OpenAI itself and
against compatible servers (Ollama, vLLM, LM Studio, llama.cpp, LiteLLM, ...)
through ``OPENAI_BASE_URL``. `variables()` lists the settings read from the
environment (declared once, in ``settings.py``, the way ``bridge/config.py`` declares
its own); a worker serving this handler reads and checks them when it starts, and a
bad value stops it with one line (`reset_settings()` forgets them, for tests). With
several agents, an agent's ``[<agent>.openai]`` table in AGENTS_FILE overrides
``model``, ``system_prompt`` and ``temperature`` for that agent's tasks (`for_agent`).

Each worker process makes one client on its first task and shares it between all its
tasks and threads: one pool of up to POOL_CONNECTIONS (1,000) kept-alive HTTP
connections, so a threads worker at ``-c 1000`` streams a thousand answers at once
without a new TLS handshake per task. A forked process (prefork pool) makes its own.

Request payload::

    {"prompt": "the user's question",
     "context": {                                  # optional
        "messages": [                              # optional: earlier turns, oldest first
            {"role": "user", "content": "..."},
            {"role": "assistant", "content": "..."}],
        "...": "..."}}                             # any other keys: extra facts

The conversation sent to the model is, in order:

1. ``OPENAI_SYSTEM_PROMPT`` as a system message (left out if set to "");
2. ``context.messages`` verbatim, in order (roles user/assistant only, string
   content) -- this is how a chat frontend passes history. A row is written by a
   user, so it never speaks with system authority: a ``system`` turn is refused;
3. if ``context`` has keys other than ``messages``: one *user* message holding
   those keys as compact JSON (sorted keys) between ``<context>`` and
   ``</context>``, introduced as data supplied with the request, not instructions
   (``<``, ``>`` and ``&`` inside are JSON-escaped, so a value cannot close the
   block). It goes after the history and just before the question, so the facts
   sit next to the turn they belong to, and the user's prompt is sent verbatim
   rather than templated;
4. ``prompt`` as the user message.

Result (``response_payload``)::

    {"answer": "...", "model": "<model the API reports>",
     "usage": {"prompt_tokens": n, "completion_tokens": n, "total_tokens": n},
     "finish_reason": "stop" | "length" | ...}

``usage`` values are null when the server does not report usage. While
streaming (``OPENAI_STREAM``, default on) the text so far is written to the row
as ``{"answer": ..., "partial": true}`` at most once per
``OPENAI_PROGRESS_INTERVAL`` seconds; the final result replaces it.

Errors: rate limits (429, except ``insufficient_quota``), 408/409, 5xx,
timeouts, connection failures, a stream cut off before ``finish_reason`` and
error events inside a stream raise `RetryableError` (``retry_after`` from
``retry-after-ms`` / ``Retry-After``, seconds or HTTP date). Every other refusal
(400/401/403/404/422, ``content_filter``, ``content_policy_violation``, quota)
raises `ProviderError`, which fails the task at once. Messages never contain the
API key: it is scrubbed out of anything the provider sends back.

Rate limits (``OPENAI_RPM``, ``OPENAI_TPM``, ``OPENAI_TENANT_RPM``, and an agent's own
``rpm`` / ``tpm`` / ``tenant_rpm``; 0 or unset: none): before each request the handler waits
for room on the provider key, shared by every worker through Redis (`tasks.ratelimit`),
charging the prompt's estimate plus ``OPENAI_MAX_TOKENS`` (sent as ``max_tokens``), and
settles the real usage after the answer; the provider's ``Retry-After`` and
``x-ratelimit-*`` headers pause the key for every worker (``limits.py``).

The modules: ``settings`` (OPENAI_* and per-agent options), ``client`` (the
process's settings and client), ``messages`` (the payload's check and the
conversation), ``errors`` (SDK exceptions to RetryableError / ProviderError),
``limits`` (the provider key, its windows and a request's charge) and ``handler``.

The task's owner reads a classified message (`tasks.errors.public`): ``provider
unreachable``, ``provider timed out``, ``provider rate limited the request (429)``,
``provider failed the request (503)``, ``provider refused the request (401
invalid_api_key)``; the provider's own words only where they are about the request (400,
413, 422, a content-policy refusal). The exception's text, with the server's address and
the OS error, is the operator's, in the worker's log.
"""

from __future__ import annotations

try:
    import openai  # noqa: F401  (checked here, once, for a clear message)
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        'tasks.handlers.openai_chat needs the OpenAI SDK: pip install "agent-bridge[openai]"'
    ) from exc

# `settings` and `handler` below are the functions, as before the split, and hide the
# submodules of the same names: import those by their full names.
from tasks.handlers.openai_chat.client import reset_settings, settings
from tasks.handlers.openai_chat.errors import ProviderError, parse_retry_after, scrub
from tasks.handlers.openai_chat.handler import handler
from tasks.handlers.openai_chat.messages import CONTEXT_INTRO, build_messages, validate_payload
from tasks.handlers.openai_chat.settings import Settings, SettingsError, for_agent, variables

__all__ = [
    "CONTEXT_INTRO",
    "ProviderError",
    "Settings",
    "SettingsError",
    "build_messages",
    "for_agent",
    "handler",
    "parse_retry_after",
    "reset_settings",
    "scrub",
    "settings",
    "validate_payload",
    "variables",
]
