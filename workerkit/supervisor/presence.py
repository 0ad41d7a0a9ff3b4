"""The supervisor's record of its worker process, as the dashboard's workers page shows it.

One :class:`WorkerPresence` per worker process (a restarted worker is a new one): what the
supervisor already knows (the ``worker_ready`` event, its lifecycle state and deadlines, the
jobs in flight it keeps for the release) plus outcome counts, kept by plain dict increments on
the per-job path. :meth:`WorkerPresence.record` builds the :class:`Presence` the runner sends
to the worker's main process every ``PRESENCE_INTERVAL`` and at each state change; the worker
writes it to its engine's store (``workerkit.engines.presence_publisher``).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from workerkit.engines.presence import PRESENCE_INTERVAL, PRESENCE_STATES, Presence, PresenceState

if TYPE_CHECKING:
    from workerkit.events import WorkerReady
    from workerkit.timing.deadlines import Deadlines

__all__ = ("PRESENCE_TTL", "WorkerPresence", "pod_hostname")

#: A record not refreshed within this time is lost: its worker died without a word.
PRESENCE_TTL: Final = 3 * PRESENCE_INTERVAL
#: The states whose records carry the shutdown deadlines.
_STOPPING: Final = frozenset({"draining", "releasing"})


def pod_hostname() -> str:
    """``HOSTNAME`` (a pod's name in Kubernetes), else the host's name."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


class WorkerPresence:
    """What the supervisor knows of one worker process, and its presence record.

    ``worker_id`` is ``HOSTNAME:PID:RANDOM`` (the worker's pid, 8 hex digits), the form the
    engines use for their own ids, until the worker's ``worker_ready`` names its own id (then
    that one, so that the workers page and the jobs' owner agree). Records are sent only once
    the worker is ready, so the id never changes under a published record.
    """

    def __init__(self, engine: str, pid: int, started_at: float, hostname: str | None = None):
        self.engine = engine
        self.pid = pid
        self.hostname = hostname or pod_hostname()
        self.worker_id = f"{self.hostname}:{pid}:{secrets.token_hex(4)}"
        self.started_at = started_at
        self.queues: tuple[str, ...] = ()
        self.concurrency = 0
        #: The worker said it is ready: its records go out from now on.
        self.ready = False
        # The deadlines in epoch seconds, turned once per stop: recomputed from each record's
        # own clock reading they moved by a millisecond between two records after rounding.
        self._wall_deadlines: tuple[Deadlines, float, float] | None = None
        #: queue (None: unknown) -> outcome -> jobs settled so far.
        self.counts: dict[str | None, dict[str, int]] = {}

    def worker_ready(self, event: WorkerReady) -> None:
        if not self.ready and event.worker_id:
            self.worker_id = event.worker_id
        self.ready = True
        self.engine = event.engine or self.engine
        self.queues = event.queues
        self.concurrency = event.concurrency or 0

    def finished(self, queue: str | None, outcome: str) -> None:
        """One job settled (the per-job path: a few dict operations; None is "unknown")."""
        try:
            per_queue = self.counts[queue]
        except KeyError:
            per_queue = self.counts[queue] = {}
        per_queue[outcome] = per_queue.get(outcome, 0) + 1

    def record(
        self,
        state: str,
        jobs: Iterable[str],
        deadlines: Deadlines | None,
        *,
        now: float,
        wall: float,
    ) -> Presence:
        """The record for ``state``; ``now`` on the deadlines' (monotonic) clock, ``wall`` the
        same instant in epoch seconds (the deadlines are sent as epoch seconds).

        ``heartbeat_at`` is ``wall`` here; the worker's store stamps its own clock over it.
        """
        drain = hard = None
        if deadlines is not None and state in _STOPPING:
            known = self._wall_deadlines
            if known is None or known[0] != deadlines:
                drain = round(wall + deadlines.request_stop_at - now, 3)
                hard = round(wall + deadlines.kill_at - now, 3)
                known = self._wall_deadlines = (deadlines, drain, hard)
            _, drain, hard = known
        return Presence(
            worker_id=self.worker_id,
            hostname=self.hostname,
            pid=self.pid,
            engine=self.engine,
            queues=self.queues,
            concurrency=self.concurrency,
            state=_presence_state(state),
            started_at=round(self.started_at, 3),
            heartbeat_at=round(wall, 3),
            ttl=PRESENCE_TTL,
            drain_deadline=drain,
            hard_deadline=hard,
            jobs=tuple(jobs),
            counts={q or "unknown": dict(n) for q, n in self.counts.items()},
        )


def _presence_state(state: str) -> PresenceState:
    for known in PRESENCE_STATES:
        if known == state:
            return known
    raise ValueError(f"not a presence state: {state!r}")
