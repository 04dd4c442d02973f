"""The docs a user reads in their first hour hold together: the client's README (the npm page)
stands on its own, its hook snippets work for a user without an enterprise, the example page's
query parameters are the ones its source reads, and every page that says "the guide" links the
page that names it (docs/explanation/the-integration-guide.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT_README = ROOT / "clients" / "js" / "README.md"
EXAMPLE_SOURCE = ROOT / "clients" / "js" / "example" / "src" / "main.tsx"
GUIDE_PAGE = ROOT / "docs" / "explanation" / "the-integration-guide.md"

# [text](target) and ![alt](target), and reference definitions `[name]: target`.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SAYS_THE_GUIDE = re.compile(r"\bthe (?:original )?(?:integration )?guide\b", re.IGNORECASE)


def without_code(text: str) -> str:
    """Markdown without fenced blocks and inline code, where a `[x](y)` is not a link."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def link_targets(text: str) -> list[str]:
    prose = without_code(text)
    return [*INLINE_LINK.findall(prose), *REFERENCE_LINK.findall(prose),
            *HTML_LINK.findall(prose)]


def test_client_readme_has_only_absolute_links() -> None:
    """npm shows the README from the tarball (`files: ["dist"]`), where a relative link or
    image points at nothing: only http(s) addresses and in-page anchors."""
    targets = link_targets(CLIENT_README.read_text(encoding="utf-8"))
    relative = [t for t in targets if not t.startswith(("https://", "http://", "#"))]
    assert relative == []


def test_link_finder_sees_relative_links() -> None:
    """The check above would catch each kind of relative link."""
    text = ("See [docs](../../docs/index.md), ![shot](shot.png),\n"
            '<img src="a.png"> and `[not](a/link.md)`, [ok](https://example.com) [top](#usage)\n'
            "\n[x]: docs/x.md\n")
    assert link_targets(text) == ["../../docs/index.md", "shot.png", "https://example.com",
                                  "#usage", "docs/x.md", "a.png"]


def hook_snippets(text: str) -> list[tuple[str, str]]:
    """(the prose just before it, the snippet) for each ts/tsx block that calls the hook."""
    found = []
    for match in FENCE.finditer(text):
        if match.group(1) in ("ts", "tsx") and "useAgentTask(" in match.group(2):
            before = text[:match.start()].rstrip()
            paragraph = before.rsplit("\n\n", 1)[-1]
            found.append((paragraph, match.group(2)))
    return found


def test_hook_snippets_pass_enterprise_id_only_in_the_enterprise_variant() -> None:
    """A made-up `enterpriseId` is refused for every user without that enterprise, so the
    snippets leave it out, except the one the text before it calls the enterprise members'
    variant."""
    snippets = hook_snippets(CLIENT_README.read_text(encoding="utf-8"))
    assert len(snippets) >= 2  # the hook, and re-attaching after a reload
    for before, code in snippets:
        if re.search(r"\benterpriseId\s*:", code):
            assert re.search(r"enterprise members only|enterprise variant", before,
                             re.IGNORECASE), code
            assert "your-enterprise-id" not in code
    plain = [code for _, code in snippets if not re.search(r"\benterpriseId\s*:", code)]
    assert plain, "no snippet shows the hook without enterpriseId"


def parameters_read_by_the_example() -> set[str]:
    source = EXAMPLE_SOURCE.read_text(encoding="utf-8")
    assert "new URLSearchParams(window.location.search)" in source
    return set(re.findall(r"""\bparams\.(?:get|has)\(\s*['"]([A-Za-z_]+)['"]\s*\)""", source))


def parameters_in_the_readme() -> tuple[set[str], set[str]]:
    """The rows of the README's `| parameter | meaning |` table, and the names in the example
    address it gives (`http://127.0.0.1:8000/?url=...`)."""
    text = CLIENT_README.read_text(encoding="utf-8")
    table = re.search(r"^\| parameter \| meaning \|\n\|[- |]+\|\n((?:\|.*\|\n)+)", text,
                      re.MULTILINE)
    assert table is not None, "no | parameter | meaning | table in clients/js/README.md"
    rows = {re.match(r"\| `([A-Za-z_]+)` \|", row).group(1)  # type: ignore[union-attr]
            for row in table.group(1).splitlines()}
    address = re.search(r"^http://127\.0\.0\.1:\d+/\?(\S+)$", text, re.MULTILINE)
    assert address is not None, "no example address of the page in clients/js/README.md"
    in_address = {pair.split("=", 1)[0] for pair in address.group(1).split("&")}
    return rows, in_address


def test_example_page_parameters_match_its_source() -> None:
    read = parameters_read_by_the_example()
    assert {"url", "key", "token"} <= read
    documented, in_address = parameters_in_the_readme()
    assert documented == read
    assert in_address <= read


def test_the_example_source_comment_names_real_parameters() -> None:
    """The source's own comment (`?url=&key=&token=`) names parameters it reads."""
    source = EXAMPLE_SOURCE.read_text(encoding="utf-8")
    named = re.search(r"\(`\?([a-z=&]+)`\)", source)
    assert named is not None
    assert {p.rstrip("=") for p in named.group(1).split("&")} <= parameters_read_by_the_example()


def pages_that_say_the_guide() -> list[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in pages if p != GUIDE_PAGE
            and SAYS_THE_GUIDE.search(p.read_text(encoding="utf-8"))]


def test_the_guide_page_names_the_guide() -> None:
    text = GUIDE_PAGE.read_text(encoding="utf-8")
    assert "Agent Worker Integration Guide" in text
    for step in ("Database Schema", "Option 1", "Option 2", "Running the Worker",
                 "test-worker-connection", "check-worker-status", "Troubleshooting"):
        assert step in text, step


@pytest.mark.parametrize("page", pages_that_say_the_guide(),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_that_say_the_guide_link_the_guide_page(page: Path) -> None:
    targets = link_targets(page.read_text(encoding="utf-8"))
    resolved = {(page.parent / t.split("#", 1)[0]).resolve() for t in targets
                if not t.startswith(("https://", "http://", "#"))}
    assert GUIDE_PAGE.resolve() in resolved, f"{page.relative_to(ROOT)} says 'the guide'"


def test_the_guide_is_linked_from_the_readme_and_the_docs_home() -> None:
    """Guards against the parametrized test above finding no pages at all."""
    pages = pages_that_say_the_guide()
    assert ROOT / "README.md" in pages
    assert ROOT / "docs" / "index.md" in pages
