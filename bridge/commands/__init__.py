"""One module per subcommand; each has `register(subparsers)` setting `func`."""

from __future__ import annotations

from types import ModuleType

from bridge.commands import check, dev, migrate, retry, run, status, submit

COMMANDS: list[ModuleType] = [run, dev, migrate, submit, status, check, retry]
