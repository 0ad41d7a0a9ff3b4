"""Small inline SVG charts (no JavaScript, no chart library): a queue's succeeded and failed
attempts per minute over the last hour, as two bars per minute drawn upwards from one baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from workerkit.dashboard.history import MinuteCount

__all__ = ("throughput_svg",)

_WIDTH: Final = 180
_HEIGHT: Final = 36


def throughput_svg(queue: str, minutes: Sequence[MinuteCount]) -> str:
    """An ``<svg>`` element (a string of markup, already escaped) for ``minutes``."""
    total_ok = sum(m.succeeded for m in minutes)
    total_failed = sum(m.failed for m in minutes)
    title = (
        f"{queue}: {total_ok} succeeded, {total_failed} failed in the last "
        f"{len(minutes)} min (per minute, newest on the right)"
    )
    peak = max([m.succeeded + m.failed for m in minutes] + [1])
    step = _WIDTH / max(1, len(minutes))
    bars = []
    for index, minute in enumerate(minutes):
        x = index * step
        ok_height = _HEIGHT * minute.succeeded / peak
        failed_height = _HEIGHT * minute.failed / peak
        if ok_height:
            bars.append(
                f'<rect class="ok" x="{x:.1f}" y="{_HEIGHT - ok_height:.1f}" '
                f'width="{max(step - 0.5, 0.5):.1f}" height="{ok_height:.1f}"/>'
            )
        if failed_height:
            y = _HEIGHT - ok_height - failed_height
            bars.append(
                f'<rect class="failed" x="{x:.1f}" y="{y:.1f}" '
                f'width="{max(step - 0.5, 0.5):.1f}" height="{failed_height:.1f}"/>'
            )
    return (
        f'<svg class="chart" role="img" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" data-succeeded="{total_ok}" '
        f'data-failed="{total_failed}"><title>{escape(title)}</title>'
        f'<line class="base" x1="0" y1="{_HEIGHT - 0.5}" x2="{_WIDTH}" y2="{_HEIGHT - 0.5}"/>'
        f"{''.join(bars)}</svg>"
    )
