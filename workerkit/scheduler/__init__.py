"""The leader-elected scheduler (reserved: built by the scheduler issue, DESIGN section 7).

Its parts will be the lease, the schedules' pure fire-time math, the fire records and the runner,
shaped like the supervisor: a pure state machine with time passed in, and an anyio shell.
"""

from __future__ import annotations

__all__ = ()
