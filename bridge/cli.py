"""`agent-bridge`: the one entry point. Subcommands live in `bridge/commands/`.

Expected trouble (a missing key, an unreachable database) ends with one line on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dotenv import find_dotenv, load_dotenv

from bridge.commands import COMMANDS
from bridge.config import TRANSPORTS, Settings
from bridge.errors import AgentBridgeError, ConfigError

# Every error of ours, and a network failure a library let through.
EXPECTED = (AgentBridgeError, ConnectionError, TimeoutError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-bridge",
        description="Run agent tasks from the agent_task_requests table on Celery workers.",
        epilog="Configuration comes from the environment and .env; see .env.example.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Every setting is checked once, here, before any command starts anything (`dev`
    # starts PostgreSQL and Redis, and children that read the same settings): a bad
    # value is one line naming it, exit 2, never a traceback from deep inside a command.
    try:
        validate_settings(args.command)
    except ConfigError as exc:
        print(f"agent-bridge: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except EXPECTED as exc:
        print(f"agent-bridge {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def validate_settings(command: str) -> None:
    """Read and check every setting (the .env file too); ConfigError names a bad one.
    `dev` runs its children on its own PostgreSQL, so they are checked as such."""
    environ = None
    if command == "dev":
        load_dotenv(find_dotenv(usecwd=True), override=False)
        environ = dict(os.environ)
        if environ.get("BRIDGE_TRANSPORT", "").strip() in ("", *TRANSPORTS):
            environ["BRIDGE_TRANSPORT"] = "postgres"  # what its children run with
    Settings.from_env(environ)


if __name__ == "__main__":
    raise SystemExit(main())
