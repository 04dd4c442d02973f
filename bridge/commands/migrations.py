"""`agent-bridge migrations export DIR`: our migration files, for a Supabase project.

A Supabase user keeps one migration history, the project's `supabase/migrations`, and
applies it with `supabase db push`; this copies our files into it from the installed
package, so no clone of the repository is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bridge.config import ConfigError
from bridge.migrate import MIGRATIONS_DIR, ExportConflict, export


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "migrations", help="copy the migration files into a Supabase project (export DIR)",
        description="Work with the migration files the package ships "
                    f"({MIGRATIONS_DIR}).")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    e = verbs.add_parser(
        "export", help="copy every migration file into DIR",
        description="Copy every migration file into DIR (created if missing), typically "
                    "your project's supabase/migrations; then `supabase db push` applies "
                    "them. A different file of the same name is left alone unless --force; "
                    "files already identical are skipped.")
    e.add_argument("dir", type=Path, metavar="DIR", help="e.g. supabase/migrations")
    e.add_argument("--force", action="store_true",
                   help="replace files of the same name whose content differs")
    e.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    target: Path = args.dir
    try:
        exported = export(target, force=args.force)
    except ExportConflict as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:  # not a folder, no permission
        raise ConfigError(f"cannot write to {target}: {exc.strerror or exc}") from None
    for item in exported:
        if item.copied:
            print(f"✅ copied {item.filename}")
    copied = sum(item.copied for item in exported)
    if copied < len(exported):
        print(f"✅ {len(exported) - copied} already there, unchanged")
    print(f"➡️  {copied} of {len(exported)} files copied into {target}; apply them with "
          "`supabase db push`")
    return 0
