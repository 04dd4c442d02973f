"""The benchmarks' command lines: `python -m bench.<name>` with its module docstring as
help and `--json` to keep the results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def bench_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m <module>`, with --json; the caller adds its own options."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the results to this JSON file")
    return parser


def write_json(path: Path | None, results: Any) -> None:
    """`results` as JSON into `path` (its folder made) when --json gave one."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"JSON written to {path}")
