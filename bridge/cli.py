"""`agent-bridge`: the one entry point. Subcommands live in `bridge/commands/`.

Expected trouble (a missing key, an unreachable database) ends with one line on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bridge.commands import COMMANDS
from bridge.errors import AgentBridgeError

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
    try:
        return int(args.func(args) or 0)
    except EXPECTED as exc:
        print(f"agent-bridge {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
