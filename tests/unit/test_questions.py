"""tasks.ask without a database: replay of recorded answers in order, what may be asked,
and why AnswerNeeded gets past a handler's `except Exception`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge.errors import StoreUnavailable
from tasks import InvalidQuestion, RetryableError, ask, ask_async
from tasks import questions as q


def bound(answers: list[Any] | None, loads: list[int] | None = None) -> q.Questions:
    def load() -> q.Answers | None:
        if loads is not None:
            loads.append(1)
        return None if answers is None else [{"question": f"q{n}", "answer": a}
                                             for n, a in enumerate(answers)]
    return q.Questions(load)


def run_with(questions: q.Questions, handler: Any) -> Any:
    token = q.bind(questions)
    try:
        return handler()
    finally:
        q.unbind(token)


def test_recorded_answers_come_back_in_order_then_the_next_question_is_asked() -> None:
    loads: list[int] = []

    def handler() -> Any:
        first = ask("q0")
        second = ask("q1")
        return [first, second, ask({"text": "q2"}, timeout=60)]

    with pytest.raises(q.AnswerNeeded) as needed:
        run_with(bound(["yes", {"amount": 40}], loads), handler)
    assert needed.value.question == {"text": "q2"} and needed.value.timeout == 60.0
    assert loads == [1]  # read once per run, at the first ask
    assert run_with(bound(["yes", 1, 2]), handler) == ["yes", 1, 2]


def test_answer_needed_is_not_an_exception_a_handler_catches() -> None:
    def handler() -> Any:
        try:
            return ask("Send it?")
        except Exception:  # what a careless handler writes
            return "swallowed"

    with pytest.raises(q.AnswerNeeded):
        run_with(bound(None), handler)  # no holder (None): nothing recorded


def test_what_may_be_asked() -> None:
    def asking(question: Any, **kw: Any) -> Any:
        return lambda: ask(question, **kw)

    cases: list[tuple[Any, dict[str, Any], str]] = [
            ({1, 2}, {}, "the question is not JSON: TypeError"),
            (float("nan"), {}, "the question is not JSON: ValueError"),
            ("x" * 20000, {}, "the question is 20002 bytes of JSON; at most 16384"),
            ("ok", {"timeout": 0}, "must be more than 0"),
            ("ok", {"timeout": float("inf")}, "must be more than 0"),
            ("ok", {"timeout": 4e7}, "at most 3.1536e+07 seconds"),
            ("ok", {"timeout": True}, "must be more than 0")]
    for question, kw, message in cases:
        with pytest.raises(InvalidQuestion, match=message.replace("+", r"\+")):
            run_with(bound([]), asking(question, **kw))
    assert issubclass(InvalidQuestion, ValueError)
    # A question is kept as the row holds it: a tuple becomes a list.
    with pytest.raises(q.AnswerNeeded) as needed:
        run_with(bound([]), asking(("a", 1)))
    assert needed.value.question == ["a", 1]


def test_outside_a_task_ask_says_so() -> None:
    with pytest.raises(RuntimeError, match="outside a task's handler"):
        ask("anyone?")


def test_answers_unreadable_for_a_down_database_retry_the_task() -> None:
    def down() -> q.Answers | None:
        raise StoreUnavailable("connection refused")

    with pytest.raises(RetryableError, match="answers could not be read"):
        run_with(q.Questions(down), lambda: ask("q0"))


def test_ask_async_replays_too() -> None:
    async def handler() -> Any:
        return [await ask_async("q0"), await ask_async("q1")]

    assert run_with(bound(["a", "b"]), lambda: asyncio.run(handler())) == ["a", "b"]
