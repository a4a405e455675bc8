"""Issue 21, item 8: the README is a front door (short, with links), and every relative link of the README and of
docs/*.md leads to a file that exists and, with an #anchor, to a heading that exists (GitHub's heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's ids of a page's headings: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", FENCE.sub("", markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_anchors_follow_github():
    assert anchors("## Many runs: configuration files, tracking, search\n## eval\n## eval\n") == {
        "many-runs-configuration-files-tracking-search", "eval", "eval-1"}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    text = FENCE.sub("", page.read_text())
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file.read_text()), f"{page.name}: link to {target}: no such heading"


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for heading in ("## Two commands", "## Commands", "## Documentation"):
        assert f"\n{heading}\n" in text
    for page in ("docs/usage.md", "docs/guide.md", "docs/results.md", "docs/architecture.md"):
        assert f"]({page})" in text, page


def test_the_code_points_to_sections_of_usage_that_exist():
    """Help texts and messages say where to read more as `docs/usage.md: Heading`; each such heading exists."""
    headings = set(re.findall(r"^#{1,6} (.+?)\s*$", FENCE.sub("", (ROOT / "docs" / "usage.md").read_text()), re.M))
    cited = {m for f in (ROOT / "src" / "imgclf").rglob("*.py")
             for m in re.findall(r"docs/usage\.md: ([^)\"]+?)\)", f.read_text())}
    assert cited, "no help text points into docs/usage.md"
    assert cited <= headings, cited - headings
    old = [f.name for f in (ROOT / "src" / "imgclf").rglob("*.py") if re.search(r"see README|README[:,] ", f.read_text())]
    assert not old, f"{old} send the reader to the README for text now in docs/"
