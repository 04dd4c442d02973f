"""`agent-bridge cancel ID...`: cancel tasks: pending ones at once, running ones are stopped.

Cancel tasks by id. A pending task ends failed (Cancelled) at once; a running task's
worker stops its handler and ends it failed (Cancelled), keeping the partial answer;
finished tasks are left as they are. Exit 1 if an id was not found.

Like the frontend's Stop button, it runs `cancel_agent_task` (as the service role, so
for any row): a pending row ends `failed` / Cancelled at once; a running row's worker is
asked to stop and ends it, keeping the partial answer; finished rows are left as they
are.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from bridge.commands.parsers import Subparsers, add_command
from bridge.commands.retry import resolve_all, task_id
from bridge.config import Settings
from bridge.store import open_store

EPILOG = "example: agent-bridge cancel 3f1c… 9a2e… --wait"


def register(sub: Subparsers) -> None:
    p = add_command(sub, "cancel", run, __doc__, EPILOG)
    p.add_argument("ids", nargs="+", type=task_id, metavar="ID",
                   help="task ids to cancel (or their first 8 characters or more)")
    p.add_argument("--wait", action="store_true",
                   help="wait until each running task has stopped")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="longest wait with --wait (default: 30)")


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    store = open_store(settings, pool=False)
    missing: list[str] = []
    stopping: list[str] = []
    try:
        ids, unknown = resolve_all(store, args.ids)
        missing += unknown
        for tid in ids:
            status = store.cancel(tid)
            if status is None:
                missing.append(tid)
            elif status == "processing":
                stopping.append(tid)
                print(f"⏳ {tid} is running: its worker was asked to stop it")
            else:
                print(describe(tid, store.get(tid)))
        if args.wait and stopping:
            deadline = time.monotonic() + args.timeout
            while stopping and time.monotonic() < deadline:
                time.sleep(0.2)
                for tid in list(stopping):
                    row = store.get(tid)
                    if row is None or row["status"] != "processing":
                        stopping.remove(tid)
                        print(describe(tid, row))
            for tid in stopping:
                print(f"⚠️  {tid} is still running after {args.timeout:g}s", file=sys.stderr)
    finally:
        store.close()
    for tid in missing:
        print(f"⚠️  {tid}: no such task", file=sys.stderr)
    return 1 if missing or (args.wait and stopping) else 0


def describe(tid: str, row: dict[str, Any] | None) -> str:
    if row is None:
        return f"⚠️  {tid}: no such task"
    error = row.get("error") or {}
    if row["status"] == "failed" and error.get("type") == "Cancelled":
        partial = (row.get("response_payload") or {}).get("answer")
        kept = f" (partial answer kept: {len(partial)} characters)" if partial else ""
        return f"🛑 {tid} cancelled{kept}"
    if row["status"] == "failed":
        return f"ℹ️  {tid} had already failed ({error.get('type', '?')}): unchanged"
    return f"ℹ️  {tid} is already {row['status']}: unchanged"

