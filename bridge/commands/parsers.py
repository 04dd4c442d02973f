"""What every subcommand's `register` does: add its parser, with its texts, running `run`.

A command's texts are its module's docstring, written once: the first line is
"`agent-bridge <name> ...`: <what it does>", whose part after the colon is the line in
the list of commands; the paragraph after it is the command's own --help description.
Further paragraphs are for readers of the code only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

# (A string: argparse's classes are not generic at run time.)
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_command(sub: Subparsers, name: str, run: Callable[[argparse.Namespace], int],
                doc: str | None, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of subcommand `name`, its texts from `doc` (the module's docstring, see
    above), for the command to add its arguments to."""
    help_text, description = command_texts(doc or "")
    parser = sub.add_parser(name, help=help_text, description=description, epilog=epilog)
    parser.set_defaults(func=run)
    return parser


def command_texts(doc: str) -> tuple[str, str]:
    """(the line in the list of commands, the --help description) of a module docstring."""
    paragraphs = [" ".join(p.split()) for p in doc.strip().split("\n\n")]
    help_text = paragraphs[0].split(": ", 1)[-1].removesuffix(".")
    return help_text, paragraphs[1] if len(paragraphs) > 1 else help_text
