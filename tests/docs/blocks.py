"""The fenced code blocks of the documentation: where each is, its language, its text, its marker.

A block is marked by an HTML comment on the line right above its fence (invisible on the site
and on a repository browser): ``<!-- example: run -->`` makes a Python block a program the tests
execute (and type-check); ``<!-- example: skip reason -->`` exempts a block, saying why;
``<!-- tutorial: file NAME -->`` is a file a tutorial's reader saves (tests/docs/tutorial.py).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

__all__ = ("DOCUMENTS", "ROOT", "Block", "blocks_of", "every_block")

ROOT = Path(__file__).resolve().parents[2]
#: Every Markdown file whose code blocks the tests check: docs/, the README, the examples'.
DOCUMENTS = (
    *sorted((ROOT / "docs").rglob("*.md")),
    ROOT / "README.md",
    *sorted((ROOT / "examples").glob("*/README.md")),
)

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>example|tutorial):\s*(?P<marker>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str  # the info string's first word, "" for a bare fence
    text: str  # dedented by the fence's own indentation
    marker: str  # "run", "skip ...", or ""
    tutorial: str = ""  # "file NAME", or ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        start, fence = index, match.group("fence")
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        index += 1
        body: list[str] = []
        while index < len(lines) and not closing.match(lines[index]):
            body.append(lines[index])
            index += 1
        index += 1
        marker = _MARKER.match(lines[start - 1]) if start else None
        kind = marker.group("kind") if marker else ""
        found.append(
            Block(
                path=path,
                line=start + 1,
                lang=(match.group("info").split() or [""])[0].lower(),
                text=textwrap.dedent("\n".join(body)) + "\n",
                marker=marker.group("marker") if marker and kind == "example" else "",
                tutorial=marker.group("marker") if marker and kind == "tutorial" else "",
            )
        )
    return found


def every_block() -> list[Block]:
    return [block for path in DOCUMENTS for block in blocks_of(path)]
