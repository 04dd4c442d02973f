"""`agent-bridge retry`: put failed rows back to pending with fresh attempts.

The bridge claims them again and Celery runs them as a new, fenced attempt.
"""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from datetime import UTC, datetime, timedelta

from bridge.config import Settings
from bridge.errors import AmbiguousTaskId, TaskNotFound
from bridge.store import TaskStore, open_store

MIN_PREFIX = 8  # hex digits of a short id
SHOWN_MATCHES = 3  # ids an ambiguous short id lists
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "retry", help="requeue failed tasks (by id, age or error type)",
        description="Put failed rows back to pending with fresh attempts; the bridge claims "
                    "them and Celery runs them again. Select by ids, --since and/or "
                    "--error-type (all given must match), or pass --all.",
        epilog="examples: agent-bridge retry 3f1c…  |  agent-bridge retry --since 1h "
               "--error-type RateLimitError  |  agent-bridge retry --all")
    p.add_argument("ids", nargs="*", type=task_id, metavar="ID",
                   help="task ids to requeue (or their first 8 characters or more)")
    p.add_argument("--since", type=since, metavar="WHEN",
                   help="only tasks that failed since WHEN: an ISO time "
                        "(2025-01-31T12:00) or an age such as 30m, 1h, 2d")
    p.add_argument("--error-type", metavar="TYPE",
                   help="only tasks whose error.type is TYPE (e.g. TimeLimitExceeded)")
    p.add_argument("--all", action="store_true",
                   help="requeue every failed task (needed when no selector is given)")
    p.add_argument("--attempts", type=positive, default=3, metavar="N",
                   help="fresh attempts each requeued task gets (default: 3)")
    p.set_defaults(func=run)


def task_id(text: str) -> str:
    """A task id as given: a whole UUID (normalised), or a short id, the first 8 or
    more of its hex digits (`bf762845`, as the demo and the logs print them; hyphens
    may be kept), returned lower case without hyphens for `resolve`."""
    digits = text.strip().lower().replace("-", "")
    if len(digits) == 32:
        try:
            return str(uuid.UUID(digits))
        except ValueError:
            pass
    elif MIN_PREFIX <= len(digits) < 32 and all(c in "0123456789abcdef" for c in digits):
        return digits
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a task id: give the whole id or its first {MIN_PREFIX} characters "
        "or more (e.g. bf762845)")


def resolve_all(store: TaskStore, given: list[str]) -> tuple[list[str], list[str]]:
    """(whole ids, those of `given` no task has), resolving every one before the caller
    changes anything: an ambiguous short id (AmbiguousTaskId) stops it all."""
    ids: list[str] = []
    unknown: list[str] = []
    for one in given:
        try:
            ids.append(resolve(store, one))
        except TaskNotFound:
            unknown.append(one)
    return ids, unknown


def resolve(store: TaskStore, given: str) -> str:
    """The whole id of `given` (from `task_id`): itself when whole, else the one task
    whose id starts with it. TaskNotFound when none does, AmbiguousTaskId (naming a
    few) when several do."""
    if len(given) == 36:
        return given
    found = store.find(given, limit=SHOWN_MATCHES + 1)
    if not found:
        raise TaskNotFound(f"no task id starts with {given} (or not visible with this key)")
    if len(found) > 1:
        more = ", ..." if len(found) > SHOWN_MATCHES else ""
        raise AmbiguousTaskId(f"{given} is the start of several task ids: "
                              f"{', '.join(found[:SHOWN_MATCHES])}{more}; give more of it")
    return found[0]


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def since(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive means local time) or an age like 90s, 30m, 1h, 2d, 1w."""
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(text.strip().lower())
    if match:
        return now - timedelta(**{_UNITS[match[2]]: float(match[1])})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO time (2025-01-31T12:00) nor an age (30m, 1h, 2d)"
        ) from None
    return when if when.tzinfo else when.astimezone()


def run(args: argparse.Namespace) -> int:
    selected = bool(args.ids or args.since or args.error_type)
    if not selected and not args.all:
        print("agent-bridge retry: say which failed tasks to requeue: task ids, --since "
              "and/or --error-type, or --all for every failed task", file=sys.stderr)
        return 2
    if selected and args.all:
        print("agent-bridge retry: --all requeues every failed task; drop it to use ids, "
              "--since or --error-type", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    store = open_store(settings, pool=False)
    try:
        ids, unknown = resolve_all(store, args.ids)
        requeued = store.requeue(ids=ids or None, failed_since=args.since,
                                 error_type=args.error_type,
                                 more_attempts=args.attempts) if ids or not args.ids else []
    finally:
        store.close()
    print(f"🔁 Requeued {len(requeued)} failed task(s)")
    for rid in requeued:
        print(f"   {rid}")
    not_requeued = [i for i in ids if i not in requeued] + unknown
    if not_requeued:
        print(f"⚠️  not failed (or not found), left as they are: {', '.join(not_requeued)}",
              file=sys.stderr)
        return 1
    if requeued:
        print("   The bridge will claim them again; follow them with `agent-bridge status`.")
    return 0
