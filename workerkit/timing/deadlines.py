"""The shutdown deadlines: where the drain window D and the release margin M put each step.

One definition for every process that acts on them: the supervisor's lifecycle, and an engine
worker that runs without a supervisor and keeps the same instants itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ("KILL_FRACTION", "RELEASE_FRACTION", "Deadlines")

#: The engine's release command goes out this far into the release margin M ...
RELEASE_FRACTION: Final = 0.5
#: ... and the worker is killed this far into it, which leaves 0.2 M for the supervisor's own
#: release of the deliveries it knows and for its exit.
KILL_FRACTION: Final = 0.8


@dataclass(frozen=True)
class Deadlines:
    """The shutdown deadlines, in monotonic seconds, from the instant the drain began."""

    started_at: float
    request_stop_at: float
    release_at: float
    kill_at: float
    exit_at: float

    @classmethod
    def after(cls, started_at: float, drain_window: float, release_margin: float) -> Deadlines:
        drain = max(0.0, drain_window)
        margin = max(0.0, release_margin)
        stop_at = started_at + drain
        return cls(
            started_at=started_at,
            request_stop_at=stop_at,
            release_at=stop_at + RELEASE_FRACTION * margin,
            kill_at=stop_at + KILL_FRACTION * margin,
            exit_at=stop_at + margin,
        )
