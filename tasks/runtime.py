"""The worker process's runtime: its settings, task store, writer, lease keeper and
stream flusher.

A `WorkerRuntime` is built once per worker process (after fork: a connection pool and
the lease keeper's thread do not survive one) and passed to the code that runs a task,
which reads nothing of it from module globals. `process_runtime` is the one place a
Celery task, a module-level function, finds it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from bridge.config import Settings
from bridge.store import TaskStore, open_store
from tasks.app import settings
from tasks.cancellation.watcher import CancelWatcher
from tasks.lease import LeaseKeeper
from tasks.progress import StreamFlusher
from tasks.writer import GroupWriter


@dataclass(frozen=True)
class WorkerRuntime:
    """What a worker process runs tasks with."""

    settings: Settings
    store: TaskStore  # reads, and the calls that are not a task's state (cancel checks)
    writer: GroupWriter  # every state write of the process's tasks, group-committed
    keeper: LeaseKeeper
    streams: StreamFlusher  # the partial outputs of the process's tasks

    @classmethod
    def open(cls, settings: Settings) -> WorkerRuntime:
        store = open_store(settings)
        writer = GroupWriter(store, wait=settings.group_commit_wait)
        keeper = LeaseKeeper(writer, settings.lease_seconds)
        keeper.on_hold = CancelWatcher(settings, store, keeper).watch
        return cls(settings, store, writer, keeper, StreamFlusher(writer, settings))


class ProcessRuntime:
    """This process's WorkerRuntime, opened by the first task that needs it in each
    process (a prefork child opens its own)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pid = 0
        self._runtime: WorkerRuntime | None = None
        # In the threads pool the first tasks arrive together; one store for all.
        self._lock = threading.Lock()

    def get(self) -> WorkerRuntime:
        with self._lock:
            if self._runtime is None or self._pid != os.getpid():
                self._runtime = WorkerRuntime.open(self._settings)
                self._pid = os.getpid()
            return self._runtime


process_runtime = ProcessRuntime(settings)
