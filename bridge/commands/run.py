"""`agent-bridge run`: the bridge process."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from datetime import timedelta
from types import FrameType

from bridge import logs
from bridge.celery_app import RUN_AGENT, create_celery_app
from bridge.config import Settings
from bridge.engine import Bridge
from bridge.metrics import Metrics
from bridge.publisher import Publisher
from bridge.retention import Retention, announce_off
from bridge.store import open_store

# `run --once`: what failed -> (what to say, exit code).
ONCE_FAILURES = {
    "database": ("the database (or Supabase) is unreachable", 3),
    "broker": ("the broker (Redis) is unreachable", 4),
    "schema": ("", 1),  # its message says what and the fix
    "refused": ("the database refused a call", 1),
    "unexpected": ("unexpected error", 1),
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the bridge: claim pending rows and enqueue Celery jobs",
                       description="Claim pending rows and enqueue one Celery job per row. "
                                   "Stops cleanly on SIGTERM/SIGINT.")
    p.add_argument("--once", action="store_true",
                   help="do one round (rescue, claim, enqueue) and exit: 0 done, 3 database "
                        "or Supabase unreachable, 4 Redis unreachable, 1 refused or other")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    logs.configure(settings.log_level, settings.log_format)
    app = create_celery_app(settings)  # publishes by task name: no worker code loads here
    store = open_store(settings, listen=True)
    metrics = Metrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    bridge = Bridge(settings, store, Publisher(app, settings.celery_queue, RUN_AGENT), metrics)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()
        store.interrupt()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Retention on its own thread and connection: never in a claim's transaction, and
    # a claim never waits for it (bridge/retention.py). Not part of a `--once` round.
    retention: Retention | None = None
    if settings.retention_days > 0 and not args.once:
        retention = Retention(open_store(settings, pool=False),
                              timedelta(days=settings.retention_days))
        retention.start(stop)
    elif not args.once:
        announce_off()
    try:
        failure = bridge.run(stop, once=args.once)
    finally:
        stop.set()
        if retention is not None:
            retention.join(timeout=15)  # a batch is short; a daemon thread in any case
            retention.store.close()
        store.close()
    if failure is None:
        return 0
    what, code = ONCE_FAILURES[failure.what]
    said = f"the round failed, {what}: " if what else ""
    print(f"agent-bridge run: {said}{failure.message}", file=sys.stderr)
    return code
