"""Real processes for pipeline tests: `celery -A tasks worker` and `agent-bridge run`.

Each process logs to a file in the test's tmp dir; `Stack.wait_for` polls the database
until a condition holds, and shows every log when it does not. Process handling (process
groups, stop, kill -9, readiness) is bridge/processes.py, shared with bench/ and `dev`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bridge import processes

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Fast leases and sweeps so failure tests finish in seconds, not minutes.
FAST = {
    "LEASE_SECONDS": "2",
    "RESCUE_INTERVAL": "0.5",
    "POLL_INTERVAL": "0.5",
    "HEARTBEAT_INTERVAL": "5",
    "AGENT_TIME_LIMIT": "60",
    "AGENT_RETRY_BACKOFF": "0.2",
    "AGENT_RETRY_BACKOFF_MAX": "1",
    "AGENT_HANDLER": "tests.handlers:scripted",
    "AGENT_SIMULATED_SECONDS": "0.1",
    "LOG_LEVEL": "INFO",
}


class Proc(processes.Proc):
    """A test's child process, run from the repository root (see bridge/processes.py)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str],
                 log_path: Path | None = None, *, cwd: Path | None = REPO) -> None:
        super().__init__(name, args, env, log_path, cwd=cwd)


class Stack(processes.ProcGroup[Proc]):
    """The processes of one test, all on the test's database and Redis; each logs to
    `<tmp>/<name><n>.log`."""

    def __init__(self, db_url: str, redis_url: str, tmp: Path, **env: str) -> None:
        self.db_url = db_url
        self.tmp = tmp
        self.state_dir = tmp / "handler-state"
        self.state_dir.mkdir(exist_ok=True)
        full = {**os.environ, **FAST, "DATABASE_URL": db_url, "REDIS_URL": redis_url,
                "BRIDGE_TRANSPORT": "postgres", "TEST_STATE_DIR": str(self.state_dir),
                "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **env}
        full.pop("CELERY_BROKER_URL", None)
        super().__init__(full, Proc, log_dir=tmp, cwd=REPO)

    def worker(self, *, pool: str = "prefork", concurrency: int = 2, wait: bool = True,
               queues: str | None = None, **env: str) -> Proc:
        """A worker; `queues` is Celery's -Q (default: every agent's queue)."""
        return self.start_worker("tasks", pool=pool, concurrency=concurrency,
                                 node=f"w{self.count('worker')}", queues=queues,
                                 ready_within=60 if wait else None, **env)

    def bridge(self, *, wait: bool = True, **env: str) -> Proc:
        return self.start_bridge(ready_within=30 if wait else None, **env)

    # Database views ----------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        with psycopg.connect(self.db_url, row_factory=dict_row) as conn:
            return conn.execute("select * from public.agent_task_requests").fetchall()

    def row(self, task_id: str) -> dict[str, Any]:
        return next(r for r in self.rows() if str(r["id"]) == task_id)

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except psycopg.OperationalError:
                pass  # the database may be down on purpose
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\nrows: {self._summary()}\n"
                             f"{self.logs()}")

    def wait_all_done(self, timeout: float = 60) -> list[dict[str, Any]]:
        self.wait_for("every row to finish", lambda: all(
            r["status"] in ("completed", "failed") for r in self.rows()), timeout)
        return self.rows()

    def _summary(self) -> str:
        try:
            return str([(str(r["id"])[:8], r["status"], r["attempts"]) for r in self.rows()])
        except psycopg.Error as exc:
            return f"(unavailable: {exc})"

    def runs(self, task_id: str) -> list[str]:
        """One line per time the handler started on this task (any process)."""
        path = self.state_dir / f"{task_id}.runs"
        return path.read_text().splitlines() if path.exists() else []
