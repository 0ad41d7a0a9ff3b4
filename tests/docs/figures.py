"""Figures in the docs' prose tied to the benchmark results they quote.

A figure is marked by an HTML comment right after the number (invisible on the site)::

    idle exit 59.7<!-- figure: bench/results/supervisor.json#summary.KEY.median*1000 --> ms

The source is a result file under bench/results/ and a key: in a ``.json`` file a dotted path
to a number; in a ``.md`` file ``ROW/COLUMN``, the first table row with a cell containing ROW,
and the first number of its cell under the header that starts with COLUMN (for results recorded
only as a table). ``*F`` scales the recorded value (seconds to milliseconds: ``*1000``). The
figure must equal the recorded value rounded to the decimals the prose shows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from tests.docs.blocks import ROOT

__all__ = ("Figure", "figures_of", "recorded", "shown_matches")

_MARKED = re.compile(
    r"(?P<number>(?:(?<![^\s(])[-+])?\d[\d,]*(?:\.\d+)?)\s*(?:%|ms|s|MiB|x)?\s*"
    r"<!--\s*figure:\s*(?P<path>[^#\s]+)#(?P<key>[^*]+?)(?:\*(?P<scale>[\d.]+))?\s*-->"
)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Figure:
    page: Path
    line: int
    shown: str  # the number as the prose prints it
    source: str  # bench/results/FILE
    key: str
    scale: Decimal

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def figures_of(page: Path) -> list[Figure]:
    found: list[Figure] = []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        for m in _MARKED.finditer(line):
            scale = Decimal(m["scale"]) if m["scale"] else Decimal(1)
            found.append(Figure(page, number, m["number"], m["path"], m["key"].strip(), scale))
    return found


def _from_json(data: Any, key: str) -> Decimal:
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    if not isinstance(data, int | float) or isinstance(data, bool):
        raise ValueError(f"{key}: not a number but {data!r}")
    return Decimal(str(data))


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _from_table(text: str, key: str) -> Decimal:
    row_text, _, column = key.partition("/")
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = cells
            continue
        if any(row_text in cell for cell in cells):
            index = next(i for i, name in enumerate(header) if name.startswith(column))
            number = _NUMBER.search(cells[index])
            if number is None:
                raise ValueError(f"{key}: no number in {cells[index]!r}")
            return Decimal(number.group())
    raise ValueError(f"{key}: no table row with {row_text!r}")


def recorded(figure: Figure) -> Decimal:
    """The recorded value the figure quotes, scaled."""
    path = ROOT / figure.source
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        value = _from_json(json.loads(text), figure.key)
    else:
        value = _from_table(text, figure.key)
    return value * figure.scale


def shown_matches(shown: str, value: Decimal) -> bool:
    """Whether the prose's number is ``value`` rounded to the decimals it shows."""
    number = Decimal(shown.replace(",", "").lstrip("+"))
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    return value.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_HALF_EVEN) == number
