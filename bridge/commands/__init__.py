"""One module per subcommand; each has `register(subparsers)` setting `func`."""

from __future__ import annotations

from types import ModuleType

from bridge.commands import (
    cancel,
    check,
    dev,
    migrate,
    migrations,
    prune,
    retry,
    run,
    show,
    status,
    submit,
    usage,
)

COMMANDS: list[ModuleType] = [run, dev, migrate, migrations, submit, status, show, check, retry,
                              cancel, prune, usage]
