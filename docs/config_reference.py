"""The configuration reference's tables, generated from the settings objects.

docs/reference/configuration.md is prose around two generated tables, each between
`<!-- settings: NAME -->` and `<!-- end settings -->`. `python docs/config_reference.py`
rewrites them from `bridge.config.Settings` and the OpenAI handler's settings; as a MkDocs
hook (mkdocs.yml) it fills them at build time, so the site always shows the code's values;
tests/unit/test_config_docs.py fails while the page in the repository and the code differ.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.config import variables as bridge_variables
from tasks.handlers.openai_chat import variables as openai_variables

PAGE = Path(__file__).resolve().parent / "reference" / "configuration.md"
BLOCK = re.compile(r"(<!-- settings: (?P<name>[a-z_]+) -->\n).*?(<!-- end settings -->)", re.S)


SOURCES: dict[str, Callable[[], list[tuple[str, Any, str]]]] = {
    "bridge": bridge_variables,
    "openai": openai_variables,
}


def shown(default: Any) -> str:
    """A default as the table shows it: booleans as they are written in `.env`."""
    if default == "":
        return ""
    if isinstance(default, bool):
        return "`true`" if default else "`false`"
    if isinstance(default, str) and default.startswith("("):
        return default  # (required)
    return f"`{default}`"


def table(rows: list[tuple[str, Any, str]]) -> str:
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | {shown(default)} | {help} |" for name, default, help in rows]
    return "\n".join(lines) + "\n"


def render(page: str) -> str:
    """`page` with every generated table rewritten from its settings object."""
    def fill(match: re.Match[str]) -> str:
        return match.group(1) + table(SOURCES[match.group("name")]()) + match.group(3)

    return BLOCK.sub(fill, page)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """MkDocs hook: the configuration page with its tables filled from the code."""
    return render(markdown) if page.file.src_uri == "reference/configuration.md" else markdown


def main() -> None:
    text = PAGE.read_text(encoding="utf-8")
    PAGE.write_text(render(text), encoding="utf-8")
    print(f"rewrote the settings tables of {PAGE}", file=sys.stderr)


if __name__ == "__main__":
    main()
