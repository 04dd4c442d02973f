"""The handler: one chat completion per task, streamed (with partial answers written to
the row) or not; an SDK exception becomes a RetryableError or ProviderError (errors.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam

from tasks.agent import agents, current_agent
from tasks.cancellation import raise_if_cancelled
from tasks.errors import RetryableError
from tasks.handlers.openai_chat import limits
from tasks.handlers.openai_chat.client import get_client, settings
from tasks.handlers.openai_chat.errors import (
    PERMANENT_429_CODES,
    ProviderError,
    content_filtered,
    translate_error,
)
from tasks.handlers.openai_chat.messages import build_messages, validate_payload
from tasks.handlers.openai_chat.settings import Settings, for_agent
from tasks.progress import report_progress
from tasks.ratelimit import Permit, acquire, bind_deadline, time_left, unbind_deadline
from tasks.usage import BudgetExceeded, report_usage

# The package's name, as before it was split: operators' logging config names it.
log = logging.getLogger(__name__.rpartition(".")[0])


def _usage(usage: Any) -> dict[str, int | None]:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: getattr(usage, k, None) if usage is not None else None for k in keys}


def _options(current: Settings) -> dict[str, Any]:
    return {"max_tokens": current.max_tokens} if current.max_tokens else {}


def _complete(client: openai.OpenAI, current: Settings,
              messages: list[ChatCompletionMessageParam], permit: Permit) -> dict[str, Any]:
    raw = client.chat.completions.with_raw_response.create(
        model=current.model, messages=messages, temperature=current.temperature,
        **_options(current))
    permit.observe(raw.headers, raw.status_code)
    completion = raw.parse()
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
            messages: list[ChatCompletionMessageParam], permit: Permit) -> dict[str, Any]:
    raw = client.chat.completions.with_raw_response.create(
        model=current.model, messages=messages, temperature=current.temperature,
        stream=True, stream_options={"include_usage": True}, **_options(current))
    permit.observe(raw.headers, raw.status_code)
    stream = raw.parse()
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


@contextlib.contextmanager
def _deadline() -> Iterator[None]:
    """The task's deadline for the rate limiter's wait, from now (the handler's start)
    when the runner has not bound one."""
    agent = current_agent()
    token = bind_deadline(agent.time_limit) if agent and time_left() is None else None
    try:
        yield
    finally:
        if token is not None:
            unbind_deadline(token)


def spend(task: dict[str, Any]) -> dict[str, Any] | None:
    """What one run may spend, reserved from the tenant's budget before it runs
    (tasks/usage.py): the prompt's estimate and the most answer (OPENAI_MAX_TOKENS, or the
    agent's max_tokens). Nothing without a most answer: the spend is then unbounded."""
    current = for_agent(settings())
    if not current.max_tokens:
        return None
    payload: Any = task.get("request_payload")
    validate_payload(payload)
    messages = build_messages(payload, current.system_prompt)
    return {"tokens": limits.estimate(messages, current.max_tokens)}


def within_budget(current: Settings, messages: list[ChatCompletionMessageParam],
                  task: dict[str, Any]) -> Settings:
    """`current` with max_tokens lowered to what the grant leaves after the prompt."""
    granted = (task.get("budget") or {}).get("tokens")
    if granted is None:
        return current
    answer = int(granted) - limits.estimate(messages, 0)
    if answer < 1:
        report_usage()  # nothing was asked: the reservation is given back, not charged
        raise BudgetExceeded(f"the tenant's token budget left {granted} tokens, not enough "
                             f"for this prompt")
    if current.max_tokens and current.max_tokens <= answer:
        return current
    return dataclasses.replace(current, max_tokens=answer)


def handler(task: dict[str, Any]) -> dict[str, Any]:
    """Answer `task["request_payload"]["prompt"]` with the configured chat model."""
    payload: Any = task.get("request_payload")
    validate_payload(payload)
    with _deadline():
        current = for_agent(settings())
        client = get_client(current)
        messages = build_messages(payload, current.system_prompt)
        current = within_budget(current, messages, task)
        fields = {"task_id": task.get("id"), "attempt": task.get("attempt")}
        # Wait for room on the provider key (no windows: no limit, nothing waits).
        permit = acquire(limits.provider_key(current),
                         limits.windows(current, current_agent(), task),
                         tokens=limits.estimate(messages, current.max_tokens), fields=fields)
        return _ask(client, current, messages, permit, fields)


def _ask(client: openai.OpenAI, current: Settings, messages: list[ChatCompletionMessageParam],
         permit: Permit, fields: dict[str, Any]) -> dict[str, Any]:
    log.info("Asking %s (%d messages, stream=%s)", current.model, len(messages),
             current.stream, extra=fields)
    started = time.monotonic()
    error: Exception
    try:
        result = (_stream if current.stream else _complete)(client, current, messages, permit)
    except openai.OpenAIError as exc:
        error = translate_error(exc, current)
        if isinstance(exc, openai.APIStatusError) and exc.code not in PERMANENT_429_CODES:
            permit.observe(exc.response.headers, exc.status_code)  # a 429 pauses the key
        log.debug("OpenAI SDK raised %s", type(exc).__name__, extra=fields)
    else:
        permit.settle(result["usage"]["total_tokens"])
        used = result["usage"]
        if used["prompt_tokens"] is not None or used["completion_tokens"] is not None:
            report_usage(input_tokens=used["prompt_tokens"] or 0,
                         output_tokens=used["completion_tokens"] or 0)
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


def check_settings() -> None:
    """The OPENAI_* settings, and the agents' `[<agent>.openai]` limits against them."""
    limits.check_agents(settings(), (a for a in agents() if a.openai))


handler.validate_payload = validate_payload  # type: ignore[attr-defined]
handler.spend = spend  # type: ignore[attr-defined]
# The worker reads the OPENAI_* settings at start (tasks/startup.py): a bad one is one
# line there, not a failure of every task.
handler.check_settings = check_settings  # type: ignore[attr-defined]
