"""When a crashed worker is restarted inside the pod, and when it is not (the crash-loop limit).

The sql engine runs jobs in threads of its worker, so an out-of-memory kill of a job kills the
worker; the supervisor starts a new one (as gunicorn's arbiter and Celery's pool replace a dead
child) instead of exiting and waiting for the kubelet's restart and its growing backoff. A worker
that keeps crashing is not restarted for ever: past the limit the supervisor exits as before.
"""

from __future__ import annotations

from typing import Final

__all__ = (
    "CRASH_LOOP_LIMIT",
    "CRASH_LOOP_WINDOW",
    "RESTART_BACKOFF",
    "RESTART_BACKOFF_MAX",
    "CrashLoop",
)

#: A worker that crashed this many times within CRASH_LOOP_WINDOW seconds is not restarted: the
#: supervisor exits WORKER_CRASHED and the pod restarts (with the kubelet's own backoff).
CRASH_LOOP_LIMIT: Final = 5
CRASH_LOOP_WINDOW: Final = 60.0
#: The first restart waits this long, each next one twice as long, up to RESTART_BACKOFF_MAX.
RESTART_BACKOFF: Final = 0.5
RESTART_BACKOFF_MAX: Final = 8.0


class CrashLoop:
    """The crashes of the last CRASH_LOOP_WINDOW seconds, and the delay before the next start."""

    def __init__(self) -> None:
        self.crashes: list[float] = []

    def crashed(self, now: float) -> float | None:
        """Record a crash at ``now``; the delay before the restart, or None: do not restart."""
        self.crashes = [t for t in self.crashes if now - t < CRASH_LOOP_WINDOW] + [now]
        count = len(self.crashes)
        if count >= CRASH_LOOP_LIMIT:
            return None
        return float(min(RESTART_BACKOFF_MAX, RESTART_BACKOFF * 2 ** (count - 1)))

    def describe(self) -> str:
        return (
            f"crash {len(self.crashes)} of {CRASH_LOOP_LIMIT} within {CRASH_LOOP_WINDOW:g}s "
            "(the crash-loop limit)"
        )
