"""The lease deadline a Celery worker's main process shares with its pool children.

Only the main process renews the leases of the messages it holds, but a prefork pool child runs
the task: the engine-neutral part (the shared deadline, the watchdog thread) is
``engines/leasewatch.py``. Celery's own step: at ``raise_at`` the watchdog raises billiard's
SoftTimeLimitExceeded into the task (SIGUSR1).
"""

from __future__ import annotations

import logging
import signal
from typing import Final

from workerkit.engines import leasewatch
from workerkit.engines.leasewatch import LeaseClock, now

__all__ = ("LEASE_LOST_REASON", "LeaseClock", "Watchdog", "now")

log = logging.getLogger("workerkit.engines.celery")

#: The reason of the Reject a run the watchdog stopped becomes (task.py): it is not settled.
LEASE_LOST_REASON: Final = "the worker lost its lease on the message (workerkit)"


class Watchdog(leasewatch.Watchdog):
    """In a prefork pool child: stops the running task before its worker's leases expire.

    :class:`leasewatch.Watchdog`, whose step at ``raise_at`` raises billiard's
    SoftTimeLimitExceeded into the task (SIGUSR1).
    """

    def __init__(self, clock: LeaseClock) -> None:
        super().__init__(clock, log, raise_signal=signal.SIGUSR1)
