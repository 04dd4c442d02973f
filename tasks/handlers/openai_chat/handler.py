"""The handler: one chat completion per task, streamed (with partial answers written to
the row) or not; an SDK exception becomes a RetryableError or ProviderError (errors.py)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam

from tasks.cancellation import raise_if_cancelled
from tasks.errors import RetryableError
from tasks.handlers.openai_chat.client import get_client, settings
from tasks.handlers.openai_chat.errors import ProviderError, content_filtered, translate_error
from tasks.handlers.openai_chat.messages import build_messages, validate_payload
from tasks.handlers.openai_chat.settings import Settings, for_agent
from tasks.progress import report_progress

# The package's name, as before it was split: operators' logging config names it.
log = logging.getLogger(__name__.rpartition(".")[0])


def _usage(usage: Any) -> dict[str, int | None]:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: getattr(usage, k, None) if usage is not None else None for k in keys}


def _complete(client: openai.OpenAI, current: Settings,
              messages: list[ChatCompletionMessageParam]) -> dict[str, Any]:
    completion = client.chat.completions.create(
        model=current.model, messages=messages, temperature=current.temperature)
    if not completion.choices:
        raise ProviderError("OpenAI-compatible API returned no choices")
    choice = completion.choices[0]
    return {
        "answer": choice.message.content or "",
        "model": completion.model or current.model,
        "usage": _usage(completion.usage),
        "finish_reason": choice.finish_reason,
    }


def _stream(client: openai.OpenAI, current: Settings,
            messages: list[ChatCompletionMessageParam]) -> dict[str, Any]:
    stream = client.chat.completions.create(
        model=current.model, messages=messages, temperature=current.temperature,
        stream=True, stream_options={"include_usage": True})
    parts: list[str] = []
    model = current.model
    usage: Any = None
    finish_reason: str | None = None
    last_report = -math.inf
    reported = 0  # len(parts) at the last progress write
    with stream:  # leaving it (a cancel raises Cancelled here) closes the HTTP stream
        for chunk in stream:
            raise_if_cancelled()  # stop reading at once, not at the next progress write
            # Compatible servers are not always complete: read fields defensively.
            model = getattr(chunk, "model", None) or model
            usage = getattr(chunk, "usage", None) or usage
            for choice in getattr(chunk, "choices", None) or []:
                if getattr(choice, "index", 0) != 0:
                    continue
                text = getattr(getattr(choice, "delta", None), "content", None)
                if text:
                    parts.append(text)
                finish_reason = getattr(choice, "finish_reason", None) or finish_reason
            now = time.monotonic()
            if len(parts) > reported and now - last_report >= current.progress_interval:
                report_progress({"answer": "".join(parts), "partial": True})
                last_report, reported = now, len(parts)
    answer = "".join(parts)
    if finish_reason is None:
        raise RetryableError(
            f"the OpenAI-compatible API stream ended before the answer was finished "
            f"({len(answer)} characters received)")
    return {"answer": answer, "model": model, "usage": _usage(usage),
            "finish_reason": finish_reason}


def handler(task: dict[str, Any]) -> dict[str, Any]:
    """Answer `task["request_payload"]["prompt"]` with the configured chat model."""
    payload: Any = task.get("request_payload")
    validate_payload(payload)
    current = for_agent(settings())
    client = get_client(current)
    messages = build_messages(payload, current.system_prompt)
    fields = {"task_id": task.get("id"), "attempt": task.get("attempt")}
    log.info("Asking %s (%d messages, stream=%s)", current.model, len(messages),
             current.stream, extra=fields)
    started = time.monotonic()
    error: Exception
    try:
        result = (_stream if current.stream else _complete)(client, current, messages)
    except openai.OpenAIError as exc:
        error = translate_error(exc, current)
        log.debug("OpenAI SDK raised %s", type(exc).__name__, extra=fields)
    else:
        if result["finish_reason"] == "content_filter":
            raise content_filtered(result["answer"])
        log.info("Answer from %s: %d characters, finish_reason=%s, total_tokens=%s, %.2fs",
                 result["model"], len(result["answer"]), result["finish_reason"],
                 result["usage"]["total_tokens"], time.monotonic() - started, extra=fields)
        return result
    # Raised outside the except block so the SDK exception (whose text is the
    # provider's, unscrubbed) is not chained into tracebacks.
    log.warning("OpenAI-compatible API call failed: %s", error, extra=fields)
    raise error


handler.validate_payload = validate_payload  # type: ignore[attr-defined]
# The worker reads the OPENAI_* settings at start (tasks/startup.py): a bad one is one
# line there, not a failure of every task.
handler.check_settings = settings  # type: ignore[attr-defined]
