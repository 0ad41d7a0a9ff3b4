"""The supervisor's lifecycle as a picture, found by running its state machine, not drawn by hand.

:func:`transitions` feeds a fresh :class:`~workerkit.supervisor.lifecycle.Lifecycle` every input
it takes (signals, the worker's reports, jobs, exits, the deadlines' ticks, the release's end) in
every reachable situation, and records each change of state with what caused it; :func:`draw`
lays the states out left to right (the enum's order) as SVG text, and :func:`table` lists
what each numbered arrow stands for. A change to the machine changes
the picture, and tests/docs/test_pictures.py then fails until it is regenerated.
"""

from __future__ import annotations

import copy
import signal
from collections import deque
from collections.abc import Iterator
from xml.sax.saxutils import escape

from workerkit.supervisor.lifecycle import (
    Input,
    JobFinished,
    JobStarted,
    Lifecycle,
    ReleaseCompleted,
    SignalReceived,
    State,
    Tick,
    WorkerExited,
    WorkerReady,
    WorkerStopping,
)

__all__ = ("draw", "table", "transitions")

Edge = tuple[State, State]
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _inputs(machine: Lifecycle, now: float) -> Iterator[tuple[str, Input, float]]:
    """(what it is called, the input, the clock after it) for every input worth trying now."""
    yield "the worker reports ready", WorkerReady(now), now
    yield "the worker stops fetching on its own", WorkerStopping(now), now
    for signum in _STOP_SIGNALS:
        yield signum.name, SignalReceived(signum, now), now
    yield "SIGQUIT: release now", SignalReceived(signal.SIGQUIT, now), now
    yield "a job starts", JobStarted("job-1", {"id": "job-1"}), now
    yield "a job ends", JobFinished("job-1", "succeeded"), now
    if machine.deadlines is not None:
        d = machine.deadlines
        for label, at in (
            ("drain deadline D", d.request_stop_at),
            ("drain deadline D", d.release_at),  # a late tick: past D too
            ("drain deadline D", d.kill_at),
            ("exit deadline D + M", d.exit_at),
        ):
            if at >= now:
                yield label, Tick(at), at
    yield "the worker exits", WorkerExited(0, now), now
    yield "the worker exits", WorkerExited(1, now), now  # a crash: the same arrows
    yield "the release of its jobs ends", ReleaseCompleted(1, now), now


def _qualified(label: str, before: Lifecycle, after: Lifecycle) -> str:
    if label == "the worker exits":
        return f"{label}{', jobs in hand' if before.in_flight else ''}"
    d = after.deadlines
    stop_signal = label in {signum.name for signum in _STOP_SIGNALS}
    if stop_signal and d is not None and d.request_stop_at == d.started_at:
        return f"{label}, nothing in hand: no drain window"
    return label


def _fingerprint(machine: Lifecycle, now: float) -> tuple[object, ...]:
    fields = sorted((k, repr(v)) for k, v in vars(machine).items() if k != "_crash_loop")
    return (now, tuple(fields))


def transitions(drain_window: float = 25.0, release_margin: float = 5.0) -> dict[Edge, list[str]]:
    """Every change of state the machine makes, with the inputs that make it (sorted)."""
    start = Lifecycle(drain_window, release_margin)
    seen = {_fingerprint(start, 0.0)}
    queue = deque([(start, 0.0)])
    found: dict[Edge, set[str]] = {}
    while queue:
        machine, now = queue.popleft()
        for label, event, then in _inputs(machine, now):
            after = copy.deepcopy(machine)
            after.handle(event)
            if after.state is not machine.state:
                edge = (machine.state, after.state)
                found.setdefault(edge, set()).add(_qualified(label, machine, after))
            fingerprint = _fingerprint(after, then)
            if fingerprint not in seen:
                seen.add(fingerprint)
                queue.append((after, then))
    order = list(State)
    edges = sorted(found, key=lambda e: (order.index(e[0]), order.index(e[1])))
    return {edge: _merged_signals(found[edge]) for edge in edges}


def _merged_signals(labels: set[str]) -> list[str]:
    """ "SIGTERM", "SIGINT", "SIGHUP" (with the same qualifier) as one "SIGTERM/SIGINT/SIGHUP"."""
    names = [signum.name for signum in _STOP_SIGNALS]
    merged = set(labels)
    for label in labels:
        if label.startswith(names[0]):
            rest = label.removeprefix(names[0])
            if all(name + rest in labels for name in names):
                merged -= {name + rest for name in names}
                merged.add("/".join(names) + rest)
    return sorted(merged)


# --- drawing ------------------------------------------------------------------------------------

_GAP, _BOX_W, _BOX_H, _LEFT = 210, 120, 40, 30
_FONT = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace"
_FILL = {
    State.STARTING: "#90a4ae",
    State.READY: "#43a047",
    State.DRAINING: "#42a5f5",
    State.RELEASING: "#ffa726",
    State.STOPPED: "#616161",
}


def _centre(state: State) -> float:
    return _LEFT + _BOX_W / 2 + list(State).index(state) * _GAP


def _arc(edge: Edge, number: int, mid: float) -> list[str]:
    """The edge as a curve above or below the row of states, with its number at the apex."""
    i, j = (list(State).index(s) for s in edge)
    above = i % 2 == 0
    sign = -1 if above else 1
    x1, x2 = _centre(edge[0]) + 20, _centre(edge[1]) - 20
    y = mid + sign * _BOX_H / 2
    height = 0 if j - i == 1 else 40 + 38 * (j - i - 2)
    if height == 0:  # neighbours: a straight arrow between the boxes
        x1, x2 = _centre(edge[0]) + _BOX_W / 2, _centre(edge[1]) - _BOX_W / 2
        path, bx, by = f"M{x1:g},{mid:g} L{x2:g},{mid:g}", (x1 + x2) / 2, mid
    else:
        cy = y + sign * 2 * height
        path, bx, by = f"M{x1:g},{y:g} Q{(x1 + x2) / 2:g},{cy:g} {x2:g},{y:g}", (x1 + x2) / 2, y
        by += sign * height
    return [
        (
            f'<path d="{path}" fill="none" stroke="#455a64" stroke-width="1.5"'
            ' marker-end="url(#arrow)"/>'
        ),
        f'<circle cx="{bx:g}" cy="{by:g}" r="10" fill="#ffffff" stroke="#455a64"/>',
        f'<text x="{bx:g}" y="{by + 4:g}" text-anchor="middle">{number}</text>',
    ]


def draw(edges: dict[Edge, list[str]]) -> str:
    """The states in a row, each change of state a numbered arrow (:func:`table` says what)."""
    width = _LEFT * 2 + _BOX_W + _GAP * (len(State) - 1)
    mid = 190
    parts: list[str] = []
    for number, edge in enumerate(edges, 1):
        parts += _arc(edge, number, mid)
    for state in State:
        x = _centre(state) - _BOX_W / 2
        parts.append(
            f'<rect x="{x:g}" y="{mid - _BOX_H / 2:g}" width="{_BOX_W}" height="{_BOX_H}" rx="8"'
            f' fill="{_FILL[state]}"/>'
        )
        parts.append(
            f'<text x="{_centre(state):g}" y="{mid + 5:g}" text-anchor="middle" fill="#ffffff"'
            f' font-size="14" font-weight="bold">{escape(state.value)}</text>'
        )
    y = mid + 130
    height = round(y + 6)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" font-family="{_FONT}" font-size="12" fill="#212121"'
        ' role="img">'
    )
    defs = (
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7"'
        ' markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 Z"'
        ' fill="#455a64"/></marker></defs>'
    )
    title = "<title>The supervisor's lifecycle: its states and what moves it between them</title>"
    background = f'<rect width="{width}" height="{height}" fill="#ffffff"/>'
    return "\n".join([head, title, defs, background, *parts, "</svg>"]) + "\n"


def table(edges: dict[Edge, list[str]]) -> str:
    """The numbered arrows of :func:`draw` as a Markdown table: from, to, what moves it."""
    rows = ["| # | from | to | what moves it |", "|---|---|---|---|"]
    for number, ((before, after), labels) in enumerate(edges.items(), 1):
        rows.append(f"| {number} | `{before.value}` | `{after.value}` | {'; '.join(labels)} |")
    return "\n".join(rows) + "\n"
