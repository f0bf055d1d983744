"""The README and docs/ hold together: every relative link names a file that exists (and,
with a #fragment, a heading in it), every page of docs/ is in its index, and the index
is linked from the README."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import REPO

FENCE = re.compile(r"^ *```.*?^ *```", re.S | re.M)
CODE = re.compile(r"``.*?``|`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def pages(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text: lower case, punctuation
    other than - and _ dropped, spaces as -."""
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def links(text: str) -> list[str]:
    """The link targets of a Markdown text, outside code blocks and code spans."""
    return LINK.findall(CODE.sub("", FENCE.sub("", text)))


def broken_links(files: list[Path]) -> list[str]:
    """'file: target (why)' for each relative link that points nowhere."""
    broken = []
    for page in files:
        text = page.read_text(encoding="utf-8")
        for target in links(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(
                    dest.read_text(encoding="utf-8")):
                broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_resolves():
    assert len(pages()) > 5
    assert broken_links(pages()) == []


def test_the_link_check_catches_a_missing_file_or_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Some part\n", encoding="utf-8")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md) [ok](docs/a.md#some-part) [ok](#top) [web](https://x.org/y)\n"
        "`[not a link](nowhere.md)` ``a `[b](nowhere.md)` c``\n\n```\n[nor this](nowhere.md)\n```\n"
        "[gone](docs/b.md) [bad](docs/a.md#no-part)\n\n# Top\n", encoding="utf-8")
    assert broken_links(pages(tmp_path)) == [
        "README.md: docs/b.md (no such file)",
        "README.md: docs/a.md#no-part (no such heading)"]


def test_every_docs_page_is_indexed_and_the_index_is_linked_from_the_readme():
    index = REPO / "docs" / "README.md"
    listed = {Path(t.partition("#")[0]).name
              for t in links(index.read_text(encoding="utf-8"))}
    assert {p.name for p in pages()[1:]} - {"README.md"} <= listed
    assert "docs/README.md" in links((REPO / "README.md").read_text(encoding="utf-8"))


def test_each_docs_page_opens_with_a_title_and_a_one_line_intro():
    for page in pages()[1:]:
        lines = page.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# "), page.name
        assert lines[1] == "" and lines[2] and lines[3] == "", page.name
