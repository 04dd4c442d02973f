"""The seed guide's design, as the baseline: one loop that polls every 2 seconds.

"Poll every 2 seconds for pending tasks ... Process each task": select one pending
row, mark it processing, run the handler inline, mark it completed, sleep 2 s,
repeat. No leases, no fencing, no concurrency. It talks to Postgres directly
(psycopg, autocommit), which is faster than the guide's supabase-py HTTP calls, so
it flatters the baseline. Run as `python -m bench.seed_baseline` with DATABASE_URL
and AGENT_HANDLER (default bench.handlers:noop).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tasks.handlers import load_handler

POLL_SECONDS = 2.0


def main() -> int:
    url = os.environ["DATABASE_URL"]
    handler = load_handler(os.environ.get("AGENT_HANDLER", "bench.handlers:noop"))
    poll = float(os.environ.get("SEED_POLL_SECONDS", POLL_SECONDS))
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("seed baseline ONLINE", flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            row = conn.execute(
                "select id, request_payload from public.agent_task_requests "
                "where status = 'pending' limit 1").fetchone()
            if row is not None:
                task_id = str(row[0])
                conn.execute("update public.agent_task_requests set status = 'processing' "
                             "where id = %s", [task_id])
                task: dict[str, Any] = {"id": task_id, "request_payload": row[1], "attempt": 1}
                try:
                    result = handler(task)
                    conn.execute(
                        "update public.agent_task_requests set status = 'completed', "
                        "response_payload = %s where id = %s", [Jsonb(result), task_id])
                except Exception as exc:
                    conn.execute(
                        "update public.agent_task_requests set status = 'failed', "
                        "response_payload = %s where id = %s",
                        [Jsonb({"error": str(exc)}), task_id])
            stop.wait(poll)
    print(f"seed baseline stopped at {time.strftime('%H:%M:%S')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
