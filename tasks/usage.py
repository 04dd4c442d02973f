"""What a handler spends: `report_usage` while it runs, and `spends` to declare up front.

A run's reports add up; the worker writes their sum with the attempt's outcome, in the same
transaction (public.agent_tasks_write kind `usage`), so the tenant's spend counts it once,
and only with an outcome that was stored. A failed or cancelled run's usage counts too: the
money was spent.

A handler that declares what one run may spend (`@spends(tokens=..., cost=...)`, or a
`spend` attribute: a mapping, or a callable taking the task and returning one) has that
reserved from its
tenant's budget when the worker takes the attempt: concurrent tasks of one tenant cannot
overshoot together. The handler receives the grant as `task["budget"]` (`{"tokens",
"cost"}`, less than declared when less is left) and must keep within it. A run that ends
without reporting is charged its whole reservation; report zero to say it spent nothing.
"""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from bridge.errors import AgentBridgeError

__all__ = ["BudgetExceeded", "UsageMeter", "declared_spend", "report_usage",
           "report_usage_async", "spends"]

F = TypeVar("F", bound=Callable[..., Any])

_meter: contextvars.ContextVar[UsageMeter | None] = contextvars.ContextVar(
    "agent_bridge_usage", default=None)


class BudgetExceeded(AgentBridgeError):
    """Raise it when the grant (`task["budget"]`) cannot cover the work: the task fails
    with error.type BudgetExceeded, without retries."""


class UsageMeter:
    """One run's reported usage, summed (reports may come from the handler's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._input = 0
        self._output = 0
        self._cost = 0.0
        self._reported = False

    def add(self, input_tokens: int, output_tokens: int, cost: float) -> None:
        with self._lock:
            self._input += input_tokens
            self._output += output_tokens
            self._cost += cost
            self._reported = True

    def totals(self) -> dict[str, Any] | None:
        """The run's usage as the database takes it; None when nothing was reported."""
        with self._lock:
            if not self._reported:
                return None
            return {"input_tokens": self._input, "output_tokens": self._output,
                    "cost": round(self._cost, 6)}


def report_usage(*, input_tokens: int = 0, output_tokens: int = 0, cost: float = 0.0) -> bool:
    """Add what this run spent (tokens in and out, and cost in your unit, e.g. USD).
    Returns False outside a task (nothing to count it against)."""
    _check_count("input_tokens", input_tokens)
    _check_count("output_tokens", output_tokens)
    if isinstance(cost, bool) or not isinstance(cost, int | float) or not math.isfinite(cost) \
            or cost < 0:
        raise ValueError(f"cost must be a finite number of 0 or more, got {cost!r}")
    meter = _meter.get()
    if meter is None:
        return False
    meter.add(input_tokens, output_tokens, float(cost))
    return True


async def report_usage_async(*, input_tokens: int = 0, output_tokens: int = 0,
                             cost: float = 0.0) -> bool:
    """`report_usage` for async handlers (it does no I/O: the sum is written with the
    outcome)."""
    return report_usage(input_tokens=input_tokens, output_tokens=output_tokens, cost=cost)


def spends(*, tokens: int | None = None, cost: float | None = None) -> Callable[[F], F]:
    """Declare what one run of the handler may spend, to be reserved from the tenant's
    budget before it runs."""
    if tokens is not None:
        _check_count("tokens", tokens)
    if cost is not None and (isinstance(cost, bool) or not isinstance(cost, int | float)
                             or not math.isfinite(cost) or cost < 0):
        raise ValueError(f"cost must be a finite number of 0 or more, got {cost!r}")
    declared = {"tokens": tokens, "cost": cost}

    def mark(handler: F) -> F:
        handler.spend = declared  # type: ignore[attr-defined]
        return handler
    return mark


def declared_spend(handler: object, task: Mapping[str, Any]) -> dict[str, Any] | None:
    """What `handler` declared one run of `task` may spend ({tokens, cost}), or None."""
    spend = getattr(handler, "spend", None)
    if callable(spend):
        spend = spend(task)
    if not isinstance(spend, Mapping):
        return None
    declared = {"tokens": spend.get("tokens"), "cost": spend.get("cost")}
    return declared if any(v is not None for v in declared.values()) else None


def bind(meter: UsageMeter) -> contextvars.Token[UsageMeter | None]:
    return _meter.set(meter)


def unbind(token: contextvars.Token[UsageMeter | None]) -> None:
    _meter.reset(token)


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number of 0 or more, got {value!r}")
