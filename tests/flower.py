"""A Flower of the test's own, and its HTTP API with basic auth."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.stack import BIN, Proc, Stack

AUTH = ("user", "pass")


def start_flower(stack: Stack, port: int) -> Proc:
    proc = Proc("flower", [str(BIN / "celery"), "-A", "tasks", "flower", f"--port={port}",
                           "--basic-auth=user:pass", "--address=127.0.0.1"],
                stack.env, stack.tmp / "flower.log")
    stack.procs.append(proc)  # stopped with the rest
    return proc


def poll(what: str, check: Callable[[], Any], proc: Proc, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except httpx.TransportError:
            found = None
        if found:
            return found
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited:\n{proc.output}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{proc.output}")

