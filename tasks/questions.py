"""Human in the loop: a handler asks its user, and goes on with the answer.

`ask(question)` returns the answer to the handler's n-th question when the task already
has it; otherwise it ends the run. The row then records the question (`waiting_for`, which
its user reads) and goes back to the queue, `pending`, with no worker and no lease, until
its user answers (`public.answer_agent_task`) or the question's timeout passes (the task
ends `failed` / NoAnswer). An answered task is queued again and its handler runs from the
top: each `ask` returns the recorded answers in order (read from the row once per run), so
a handler written top to bottom replays to where it stopped and goes on from there.

What a handler does before a question therefore runs again after every answer: ask before
paid work, or make that work safe to repeat (it already must be, at least once).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

from bridge.errors import AgentBridgeError, StoreUnavailable
from tasks.errors import RetryableError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 86400.0  # a day
MAX_TIMEOUT = 31536000.0  # a year, as the database allows
MAX_QUESTION_BYTES = 16384  # as JSON; agent_task_wait refuses more

Answers = list[dict[str, Any]]


class AnswerNeeded(BaseException):
    """Raised by `ask` for a question without an answer yet: it ends the run, and the worker
    records the question. A BaseException (as asyncio.CancelledError is), so that a
    handler's `except Exception` does not swallow it."""

    def __init__(self, question: Any, timeout: float) -> None:
        super().__init__("the task waits for its user's answer")
        self.question = question
        self.timeout = timeout


class InvalidQuestion(AgentBridgeError, ValueError):
    """`ask` was given a question that is not JSON, too large, or a timeout out of range."""


class Questions:
    """The questions of one run: the recorded answers, read on the first `ask`, and how
    many the handler has asked so far."""

    def __init__(self, load: Callable[[], Answers | None]) -> None:
        self._load = load
        self._answers: Answers | None = None
        self._asked = 0
        self._lock = threading.Lock()

    def next_answer(self, question: Any) -> tuple[bool, Any]:
        """(True, the answer) to the next question if it has one; else (False, None)."""
        with self._lock:
            if self._answers is None:
                try:
                    self._answers = self._load() or []
                except StoreUnavailable as exc:
                    raise RetryableError(f"the task's answers could not be read: {exc}") from exc
            number = self._asked
            self._asked += 1
            if number >= len(self._answers):
                return False, None
            recorded = self._answers[number]
        if recorded.get("question") != question:
            # The answer goes with the question's place, not its text; say so (not what).
            log.warning("Question %d of this task differs from the one its user answered; "
                        "the recorded answer is used", number + 1,
                        extra={"action": "question_changed"})
        return True, recorded.get("answer")


_questions: contextvars.ContextVar[Questions | None] = contextvars.ContextVar(
    "agent_bridge_questions", default=None)


def bind(questions: Questions) -> contextvars.Token[Questions | None]:
    return _questions.set(questions)


def unbind(token: contextvars.Token[Questions | None]) -> None:
    _questions.reset(token)


def ask(question: Any, *, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Ask the task's user `question` (any JSON value, at most 16 KiB: a string, or e.g.
    `{"text": "Send the email?", "choices": ["approve", "deny"]}`) and return their answer.

    The first time, this ends the run (the worker slot is freed) and the task waits for the
    answer, at most `timeout` seconds (default a day); the handler then runs again from the
    top and this call returns the answer. Unanswered in time, the task ends failed /
    NoAnswer. Only in a handler, while it runs a task."""
    questions = _questions.get()
    if questions is None:
        raise RuntimeError("tasks.ask() was called outside a task's handler")
    question = _checked(question, timeout)
    found, answer = questions.next_answer(question)
    if found:
        return answer
    raise AnswerNeeded(question, float(timeout))


async def ask_async(question: Any, *, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """`ask` for async handlers: the answers are read on a thread (once per run), so the
    process's shared handler loop is not held up by the database round trip."""
    return await asyncio.to_thread(ask, question, timeout=timeout)


def _checked(question: Any, timeout: float) -> Any:
    """The question as the row will hold it (a JSON round trip), or InvalidQuestion."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
            or not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT:
        raise InvalidQuestion(f"ask(timeout=...) must be more than 0 and at most {MAX_TIMEOUT:g} "
                              f"seconds (a year), got {timeout!r}")
    try:
        text = json.dumps(question, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidQuestion(f"the question is not JSON: {type(exc).__name__}: {exc}") from None
    size = len(text.encode("utf-8"))
    if size > MAX_QUESTION_BYTES:
        raise InvalidQuestion(f"the question is {size} bytes of JSON; at most "
                              f"{MAX_QUESTION_BYTES} may be asked")
    return json.loads(text)
