"""The README stays a short user's page, and every link in it and in docs/ lands: the file exists
and, for `page.md#anchor`, the page has that heading (GitHub's anchor rule)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)      # not inside code blocks
    return [t for t in LINK.findall(text) if not t.startswith(("http://", "https://", "mailto:"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_lands(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_the_readme_is_short_and_links_its_research():
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    targets = {t.partition("#")[0] for t in links(readme)}
    assert {"docs/findings.md", "docs/usage.md", "docs/config.md", "docs/toyworld/README.md"} <= targets
    stored = [p for p in (REPO / "docs").rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".csv")]
    assert not stored, f"stored results belong in results/: {stored[:3]}"
