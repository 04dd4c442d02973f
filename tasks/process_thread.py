"""A worker process's background thread, started on first use in each process.

A thread does not survive a fork (the prefork pool forks its children after the parent may
have used these objects), so each owner starts its thread again when the process or the
thread is not the one it started.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


class ProcessThread:
    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target = target
        self._name = name
        self._thread: threading.Thread | None = None
        self._pid = 0

    def ensure(self) -> None:
        """Start the thread unless this process's is running (callers hold their lock)."""
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._target, name=self._name, daemon=True)
            self._thread.start()
