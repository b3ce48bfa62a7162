"""The documentation: every link in README and docs/ resolves, and README's quick start keeps its two commands."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# The quick start's commands, byte for byte: a newcomer pastes them, and CI runs the second one.
INSTALL_AND_RUN = (
    "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[dev]' && .venv/bin/featuresum run"
)
TEST_COMMAND = ".venv/bin/python -m pytest"
MAX_README_LINES = 250

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
# Inline code may wrap onto the next line, never across a blank one.
INLINE_CODE = re.compile(r"`(?:[^`\n]|\n(?!\n))*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def doc_pages() -> list[Path]:
    """Every page under docs/."""
    return sorted(DOCS.glob("*.md"))


def without_code(text: str) -> str:
    """Markdown with its code blocks and inline code removed: a `#` or `[x](y)` there is neither heading nor link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def relative_links(page: Path) -> list[str]:
    """The targets of the page's links that point inside the repository (no scheme such as https:)."""
    return [target for target in LINK.findall(without_code(page.read_text())) if not SCHEME.match(target)]


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    found: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        repeat = 0
        while (f"{slug}-{repeat}" if repeat else slug) in found:
            repeat += 1
        found.add(f"{slug}-{repeat}" if repeat else slug)
    return found


def broken(page: Path, target: str) -> str | None:
    """Why a relative link of `page` leads nowhere, or None when its file (and its heading) exist."""
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    if not linked.exists():
        return f"{target}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}"
    if anchor and linked.suffix == ".md" and anchor not in anchors(linked):
        return f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}"
    return None


def quick_start_commands() -> list[str]:
    """The lines of the first code block under README's `## Quick start`."""
    section = README.read_text().partition("\n## Quick start\n")[2].partition("\n## ")[0]
    block = re.search(r"^```[a-z]*\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert block, "README's Quick start has no code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_a_heading_that_exist(page):
    problems = [problem for target in relative_links(page) if (problem := broken(page, target))]
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(problems)


def test_every_docs_page_is_linked_from_readme():
    pages = doc_pages()
    assert pages, "docs/ holds no pages"
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in relative_links(README)}
    unlinked = [str(page.relative_to(ROOT)) for page in pages if page.resolve() not in linked]
    assert not unlinked, f"README.md links to none of {unlinked}"


def test_readme_stays_short():
    lines = len(README.read_text().splitlines())
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_quick_start_holds_the_install_and_run_command_and_the_test_command_that_ci_runs():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    install_and_run, test_command = commands
    assert install_and_run == INSTALL_AND_RUN
    assert test_command == TEST_COMMAND
    # CI runs README's test command as written there.
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, ".ci/run no longer runs README's test command"
