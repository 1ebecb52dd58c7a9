"""Every relative link of the repository's markdown resolves inside the repository.

A clone has nothing but the repository: a link to ``../shared/...``, to an absolute path, to a file
that was renamed, or to a heading that was reworded is dead there. Checked: README.md, docs/*.md,
benchmarks/**/*.md. Web links (http, https, mailto) are not files and are left alone.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("README.md", "docs/*.md", "benchmarks/**/*.md")

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
# [text](target "title") and ![alt](target); the target may be <wrapped in angle brackets>.
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)
_WEB = re.compile(r"^(https?|mailto):", re.IGNORECASE)


def markdown_files(root: Path = REPO_ROOT) -> list[Path]:
    return sorted({path for pattern in CHECKED for path in root.glob(pattern) if path.is_file()})


def _without_code(text: str) -> str:
    # Links inside code blocks and code spans are examples, not links.
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """The targets of every inline link, image and reference definition outside code."""
    text = _without_code(text)
    targets = [match[1] for match in _INLINE.finditer(text)] + [match[1] for match in _REFERENCE.finditer(text)]
    return [target[1:-1] if target.startswith("<") else target for target in targets]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(char for char in text if char in " -_" or unicodedata.category(char)[0] in "LNM")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 … suffixes for repeats."""
    seen: dict[str, int] = {}
    result = set()
    for match in _HEADING.finditer(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(match[2])
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """One line per link of ``path`` that leaves ``root``, names a missing file or a missing heading."""
    problems = []
    root = root.resolve()
    for target in links(path.read_text(encoding="utf-8")):
        if not target or _WEB.match(target):
            continue
        where, _, fragment = target.partition("#")
        if re.match(r"^[a-z][a-z0-9+.-]*:", where, re.IGNORECASE):
            problems.append(f"{target}: a {where.split(':')[0]}: link, not a file of the repository")
            continue
        if where.startswith("/"):
            problems.append(f"{target}: absolute path (links must be relative to the file)")
            continue
        resolved = (path.parent / unquote(where)).resolve() if where else path.resolve()
        if not resolved.is_relative_to(root):
            problems.append(f"{target}: points outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and unquote(fragment).lower() not in anchors(resolved):
            problems.append(f"{target}: {resolved.relative_to(root)} has no heading #{fragment}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_links_resolve_inside_the_repository(path):
    assert broken_links(path) == []


def test_the_checked_files_include_the_readme_and_the_design_notes():
    names = {str(path.relative_to(REPO_ROOT)) for path in markdown_files()}
    assert {"README.md", "docs/design.md", "benchmarks/README.md"} <= names


def test_the_checker_catches_dead_and_outside_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# Design\n\n## The nested `op`\n\n## Notes\n\n## Notes\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/design.md) [ok anchor](docs/design.md#the-nested-op) [repeat](docs/design.md#notes-1)\n"
        "[web](https://example.org/x) ![img](missing.png) [outside](../shared/DESIGN.md)\n"
        "[bad anchor](docs/design.md#nesting) [absolute](/etc/passwd) [self](#nowhere)\n"
        "`[in code](not-a-link.md)`\n\n```\n[fenced](also-not.md)\n```\n\n[ref]: docs/gone.md\n"
    )
    problems = broken_links(page, tmp_path)
    assert [problem.split(":")[0] for problem in problems] == [
        "missing.png", "../shared/DESIGN.md", "docs/design.md#nesting", "/etc/passwd", "#nowhere", "docs/gone.md"
    ]
