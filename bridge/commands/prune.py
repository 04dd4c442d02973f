"""`agent-bridge prune`: delete finished tasks older than an age (default AGENT_RETENTION_DAYS).

Delete completed and failed tasks whose finished_at is older than --older-than, with
their streamed chunks (and per-user day counters of days before yesterday), in batches
of short transactions that never hold up a claim. Pending and processing tasks are never
deleted. The bridge does this by itself every few minutes unless AGENT_RETENTION_DAYS=0.

As the bridge's retention does it: batches of short transactions (`agent_tasks_prune`)
that lock only finished rows and skip any another transaction holds, so it is safe while
the bridge claims.
"""

from __future__ import annotations

import argparse
import re
from datetime import timedelta

from bridge.commands.parsers import Subparsers, add_command
from bridge.config import Settings
from bridge.retention import BATCH, describe, prune
from bridge.store import open_store

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks", "": "days"}
MAX_BATCH = 10000  # agent_tasks_prune's own bound: one batch stays one short transaction


EPILOG = ("examples: agent-bridge prune --dry-run  |  agent-bridge prune --older-than 7d"
          "  |  agent-bridge prune --older-than 12h")


def register(sub: Subparsers) -> None:
    p = add_command(sub, "prune", run, __doc__, EPILOG)
    p.add_argument("--older-than", type=age, metavar="AGE",
                   help="an age such as 7d, 12h, 30m (a bare number is days); "
                        "default: AGENT_RETENTION_DAYS")
    p.add_argument("--dry-run", action="store_true",
                   help="count what would be deleted; delete nothing")
    p.add_argument("--batch", type=batch_size, default=BATCH, metavar="N",
                   help=f"rows per transaction (default: {BATCH}, at most {MAX_BATCH:,})")


def age(text: str) -> timedelta:
    """An age: a number with s, m, h, d or w (a bare number is days), more than 0."""
    match = _AGE.match(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age such as 7d, 12h or 30m")
    value = timedelta(**{_UNITS[match[2]]: float(match[1])})
    if value <= timedelta(0):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the age must be more than 0 (AGENT_RETENTION_DAYS=0 keeps everything)")
    return value


def batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to "
                                         f"{MAX_BATCH:,}")
    return value


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    older_than: timedelta | None = args.older_than
    if older_than is None:
        if settings.retention_days == 0:
            print("ℹ️  AGENT_RETENTION_DAYS=0 keeps every task: nothing pruned. Pass "
                  "--older-than AGE to prune anyway.")
            return 0
        older_than = timedelta(days=settings.retention_days)
    store = open_store(settings, pool=False)
    try:
        if args.dry_run:
            print(describe(store.prune(older_than, args.batch, dry_run=True), older_than,
                           dry_run=True))
        else:
            print(describe(prune(store, older_than, batch=args.batch), older_than))
    finally:
        store.close()
    return 0
