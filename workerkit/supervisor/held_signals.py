"""Signals that arrive before the supervisor's loop listens, kept for it.

``workerkit run`` spawns the worker and waits for its app check before the supervisor's event
loop installs its signal handlers. A SIGTERM in that window (a pod deleted while it starts)
would otherwise end the CLI without a drain, or, as PID 1, be ignored by the kernel and lost:
the pod would then start consuming jobs that the kubelet's SIGKILL later cuts off. :func:`hold`
records them from the start; the runner replays them once it listens (docs/operations/
lifecycle.md, "Signals").
"""

from __future__ import annotations

import signal
import types
from typing import Final

__all__ = ("SIGNALS", "first", "hold", "take")

#: The signals the supervisor acts on: SIGTERM, SIGINT (stop), SIGHUP, SIGQUIT.
SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

_held: list[int] = []


def _record(signum: int, frame: types.FrameType | None) -> None:
    _held.append(signum)


def hold() -> None:
    """From now until the supervisor listens, record :data:`SIGNALS` instead of acting."""
    for signum in SIGNALS:
        signal.signal(signum, _record)


def first() -> int | None:
    """The oldest signal recorded and not taken yet (kept for :func:`take`); None: none."""
    return _held[0] if _held else None


def take() -> list[int]:
    """The signals recorded so far, oldest first (and forget them)."""
    taken = list(_held)
    del _held[: len(taken)]
    return taken
