"""The README's and the docs' links lead somewhere: every relative link names a file of the repository, and
every `#anchor` a heading of the page it points into, by the anchors GitHub renders for headings."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(text: str) -> set[str]:
    """GitHub's anchor for each heading of a page: lowercased, punctuation but hyphens and underscores dropped,
    spaces made hyphens; a repeated heading's anchor gets -1, -2, ... in order. Fenced code holds no headings."""
    seen: Counter[str] = Counter()
    out = set()
    for line in FENCE.sub("", text).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        out.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return out


def test_anchors_follow_githubs_rules() -> None:
    page = "\n".join(["# Operating the fleet", "## Scheduling (`picker/scheduler.py`, `picker/plugins/`)",
                      "### Where the picker's CPU goes, by layer", "## Runbook", "text", "## Runbook",
                      "```sh", "# a comment, not a heading", "```", "#no-space is no heading either"])
    assert anchors(page) == {"operating-the-fleet", "scheduling-pickerschedulerpy-pickerplugins",
                             "where-the-pickers-cpu-goes-by-layer", "runbook", "runbook-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or ROOT not in linked.parents:
            broken.append(f"{target}: no such file in the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: no such heading in {linked.relative_to(ROOT)}")
    assert not broken, broken
