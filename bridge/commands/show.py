"""`agent-bridge show ID`: one task's status, attempts, error, answer and timings."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from bridge.commands.retry import task_id
from bridge.commands.submit import ICONS, answer_of, error_of
from bridge.config import Settings
from bridge.store import open_store

EXIT_FOUND, EXIT_MISSING = 0, 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "show", help="one task: status, attempts, error, answer and timings",
        description="Print one row of agent_task_requests: its status, attempts, agent, "
                    "error, answer and timings (created, run at, started, finished). "
                    "Exit 1 when there is no such task.")
    p.add_argument("id", type=task_id, metavar="ID", help="the task id")
    p.add_argument("--json", action="store_true", help="print the row as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    store = open_store(Settings.from_env(), pool=False)
    try:
        row = store.show(args.id)
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


def describe(row: dict[str, Any]) -> list[str]:
    status = str(row["status"])
    attempts = f"attempt {row['attempts']} of {row['max_attempts']}"
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
