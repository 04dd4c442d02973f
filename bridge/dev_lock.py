"""One `agent-bridge dev` per data dir: an exclusive lock on <data-dir>/dev.lock.

The lock is a flock(2) held for the whole run on a file that holds the running dev's
pid. The kernel drops it when the process ends, however it ends (kill -9 too), so a
lock file left behind never blocks the next dev: only a live holder counts. Its file
descriptor is not inherited (Python opens files non-inheritable), so PostgreSQL, Redis
and the children dev starts never keep it after dev is gone.

Without fcntl (Windows) there is no lock: `acquire` always succeeds, `running_dev` says
None.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from bridge.errors import AgentBridgeError

LOCK_FILE = "dev.lock"


class DevRunning(AgentBridgeError):
    """Another `agent-bridge dev` holds this data dir."""

    def __init__(self, pid: int | None) -> None:
        super().__init__(f"another agent-bridge dev runs on this data dir (pid {pid})")
        self.pid = pid


class DevLock:
    """The lock of one run: `release` (or the process's end) lets the next dev in."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def acquire(data_dir: Path) -> DevLock:
    """Take the data dir's lock and write our pid in it; DevRunning if a live dev has it."""
    if sys.platform == "win32":
        return DevLock(None)
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    # O_RDWR without O_TRUNC: the holder's pid stays readable until we own the lock.
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    # A few tries: `running_dev` (status) takes the lock for an instant to probe it.
    for attempt in range(10):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == 9:
                pid = _read_pid(fd)
                os.close(fd)
                raise DevRunning(pid) from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DevLock(fd)


def running_dev(data_dir: Path) -> int | None:
    """The pid of the live `agent-bridge dev` holding `data_dir` (-1 in the instant
    before it writes it), else None: no lock file, or a stale one (its dev is gone)."""
    if sys.platform == "win32":
        return None
    import fcntl

    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
