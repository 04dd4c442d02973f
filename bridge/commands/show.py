"""`agent-bridge show ID`: one task: status, attempts, error, answer and timings;
--follow streams its answer.

Print one row of agent_task_requests: its status, attempts, agent, error, answer and
timings (created, run at, started, finished). The id may be shortened to its first 8
characters or more. With --follow, then print its answer as it streams in. Exit 1 when
there is no such task.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from bridge.commands.parsers import Subparsers, add_command
from bridge.commands.retry import resolve, task_id
from bridge.commands.submit import (
    EXIT_COMPLETED,
    EXIT_FAILED,
    ICONS,
    answer_of,
    error_of,
    follow_answer,
    poll_interval,
)
from bridge.config import Settings
from bridge.errors import TaskNotFound
from bridge.store import open_store

EXIT_FOUND, EXIT_MISSING = 0, 1


def register(sub: Subparsers) -> None:
    p = add_command(sub, "show", run, __doc__)
    p.add_argument("id", type=task_id, metavar="ID",
                   help="the task id, or its first 8 characters or more")
    p.add_argument("--json", action="store_true", help="print the row as one JSON object")
    p.add_argument("--follow", action="store_true",
                   help="then print its answer as it streams in, until the task ends (exit "
                        "0 completed, 1 failed, 2 timed out)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="with --follow: give up after S seconds (default: 300)")


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    store = open_store(settings, pool=False)
    try:
        try:
            task = resolve(store, args.id)
        except TaskNotFound:
            row = None
        else:
            row = store.show(task)
        if row is not None and args.follow:
            print(json.dumps(row, default=str, ensure_ascii=False) if args.json
                  else "\n".join(describe(row)), flush=True)
            if row["status"] in ("completed", "failed"):  # its answer or error is shown
                return EXIT_COMPLETED if row["status"] == "completed" else EXIT_FAILED
            return follow_answer(store, str(row["id"]), args.timeout, poll_interval(settings))
    finally:
        store.close()
    if row is None:
        print(f"agent-bridge show: no task {args.id} (or not visible with this key)",
              file=sys.stderr)
        return EXIT_MISSING
    if args.json:
        print(json.dumps(row, default=str, ensure_ascii=False))
    else:
        print("\n".join(describe(row)))
    return EXIT_FOUND


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _stamp(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if value else "-"


def _span(start: datetime | None, end: datetime | None) -> str:
    return f" ({(end - start).total_seconds():.3f} s)" if start and end else ""


def attempts_of(status: str, attempt: int, most: int) -> str:
    """The attempt as a user counts: which one, and how many more may follow while the
    task can still run. Not "attempt 2 of 4": an operator's retry adds fresh attempts
    on top of the ones used (max_attempts = attempts + N), so "of 4" would count
    attempts the user never asked for; "2 more left" is true either way."""
    if status in ("completed", "failed"):
        return f"attempt {attempt}" if attempt else "never started"
    if attempt == 0:
        return f"not started, up to {most} attempt{'s' if most != 1 else ''}"
    left = max(0, most - attempt)
    when = "attempt" if status == "processing" else "after attempt"
    return f"{when} {attempt}, {left} more left" if left else f"{when} {attempt}, the last"


def describe(row: dict[str, Any]) -> list[str]:
    status = str(row["status"])
    attempts = attempts_of(status, int(row["attempts"] or 0), int(row["max_attempts"] or 0))
    created, run_at = _time(row.get("created_at")), _time(row.get("run_at"))
    started, finished = _time(row.get("started_at")), _time(row.get("finished_at"))
    lines = [f"Task {row['id']}",
             f"  status    {ICONS.get(status, '•')} {status} ({attempts})",
             f"  agent     {row.get('agent') or 'default'}, priority {row.get('priority', 0)}",
             f"  created   {_stamp(created)}"]
    if run_at and created and run_at > created:
        lines.append(f"  run at    {_stamp(run_at)}")
    lines.append(f"  started   {_stamp(started)}{_span(created, started)}")
    if status == "processing":
        lines.append(f"  worker    {row.get('worker') or '-'}, lease until "
                     f"{_stamp(_time(row.get('lease_expires_at')))}")
    lines.append(f"  finished  {_stamp(finished)}{_span(started, finished)}")
    waiting = row.get("waiting_for")
    if isinstance(waiting, dict):
        lines.append(f"  waiting   for its user's answer to question {waiting.get('number')}, "
                     f"until {_stamp(_time(waiting.get('expires_at')))}")
    if row.get("answered"):
        lines.append(f"  answers   {row['answered']} recorded")
    if row.get("cancel_requested_at"):
        lines.append(f"  cancel    asked at {_stamp(_time(row['cancel_requested_at']))}")
    if row.get("error"):
        lines.append(f"  error     {error_of(row['error'], row.get('response_payload'))}")
    response = row.get("response_payload")
    if status == "failed" and not row.get("error") and response:
        lines.append(f"  error     {error_of(None, response)}")
    if response is not None and (status != "failed" or
                                 (isinstance(response, dict) and "answer" in response)):
        lines.append(f"  answer    {answer_of(response)}")
    return lines
