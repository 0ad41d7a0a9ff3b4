"""A worker's presence in its store (what the dashboard's workers page shows), and queue pauses.

The supervisor knows a worker's lifecycle state, its deadlines, the jobs in hand and the outcomes
so far; every ``PRESENCE_INTERVAL`` seconds and at each state change it sends them to its worker
process, which writes them to the engine's store (:class:`PresenceStore`) with a time to live: a
worker killed without a word disappears from the store (or shows as lost) within ``ttl``.

A paused queue is a name in the store's pause set; workers read it through
:class:`PausedQueues` (at most every ``PAUSE_REFRESH`` seconds) and fetch only from the others.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Final, Literal, Protocol

__all__ = (
    "PAUSE_REFRESH",
    "PRESENCE_INTERVAL",
    "PRESENCE_STATES",
    "PausedQueues",
    "Presence",
    "PresenceState",
    "PresenceStore",
    "QueuePauseStore",
)

log = logging.getLogger(__name__)

#: How often the supervisor refreshes its worker's presence (and the TTL is 3 of these).
PRESENCE_INTERVAL: Final = 5.0
#: How stale a worker's view of the pause set may be: a pause takes effect within this time.
PAUSE_REFRESH: Final = 1.0

#: The supervisor's lifecycle states as a presence shows them ("stopped": exited cleanly).
PresenceState = Literal["starting", "ready", "draining", "releasing", "stopped"]
PRESENCE_STATES: Final[tuple[PresenceState, ...]] = (
    "starting",
    "ready",
    "draining",
    "releasing",
    "stopped",
)


@dataclass(frozen=True)
class Presence:
    """One worker (one supervisor and its worker process) as last published."""

    worker_id: str
    hostname: str
    pid: int
    engine: str
    queues: tuple[str, ...]
    concurrency: int
    state: PresenceState
    started_at: float
    #: When this record was published: the store's clock where the store has one.
    heartbeat_at: float
    #: The record is lost (its worker gone without a word) once ``heartbeat_at + ttl`` passed.
    ttl: float
    #: While draining/releasing: when the job in hand is asked to stop, and when what is left is
    #: killed and released (epoch seconds, the supervisor's clock).
    drain_deadline: float | None = None
    hard_deadline: float | None = None
    #: Ids of the jobs in hand.
    jobs: tuple[str, ...] = ()
    #: Outcomes since start: queue -> outcome (succeeded, failed, retried, released, ...) -> n.
    counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Presence:
        """The record :meth:`to_json` wrote; ValueError/TypeError for anything else (a field
        missing, unknown or of the wrong type), which the stores skip: one bad record never
        breaks the workers page or a history sample."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError(f"a presence is a JSON object, not {type(data).__name__}")
        if data.get("state") not in PRESENCE_STATES:
            raise ValueError(f"presence state {data.get('state')!r} is none of {PRESENCE_STATES}")
        for name in ("worker_id", "hostname", "engine"):
            if not isinstance(data.get(name), str):
                raise TypeError(f"presence {name} is not a string: {data.get(name)!r}")
        for name in ("pid", "concurrency"):
            data[name] = _integer(name, data.get(name))
        for name in ("started_at", "heartbeat_at", "ttl"):
            data[name] = _number(name, data.get(name))
        for name in ("drain_deadline", "hard_deadline"):
            if data.get(name) is not None:
                data[name] = _number(name, data[name])
        for name in ("queues", "jobs"):
            data[name] = _strings(name, data.get(name, []))
        data["counts"] = _counts(data.get("counts", {}))
        return cls(**data)

    def lost(self, now: float) -> bool:
        return self.state != "stopped" and now > self.heartbeat_at + self.ttl


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"presence {name} is not an integer: {value!r}")
    return value


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"presence {name} is not a number: {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"presence {name} is not finite: {value!r}")
    return float(value)


def _strings(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"presence {name} is not a list of strings: {value!r}")
    return tuple(value)


def _counts(value: object) -> dict[str, dict[str, int]]:
    """queue -> outcome -> n, every level checked."""
    if not isinstance(value, dict):
        raise TypeError(f"presence counts is not an object: {value!r}")
    counts: dict[str, dict[str, int]] = {}
    for queue, outcomes in value.items():
        if not isinstance(outcomes, dict):
            raise TypeError(f"presence counts of {queue!r} is not an object: {outcomes!r}")
        counts[queue] = {str(k): _integer(f"counts {queue}/{k}", n) for k, n in outcomes.items()}
    return counts


class PresenceStore(Protocol):
    """Where an engine keeps presences (its own store: a table, Redis keys)."""

    def publish(self, presence: Presence) -> None:
        """Write (replace) ``presence``, to be forgotten ``presence.ttl`` after its write (or
        shown as lost by :meth:`list_all` until pruned)."""
        ...

    def remove(self, worker_id: str) -> None: ...

    def list_all(self) -> list[Presence]:
        """Every presence the store keeps, lost ones included until pruned (by age)."""
        ...


class QueuePauseStore(Protocol):
    """An engine's pause set (the dashboard's pause/resume; read by every worker)."""

    def paused_queues(self) -> frozenset[str]: ...

    def set_queue_paused(self, queue: str, paused: bool, actor: str) -> bool:
        """Pause or resume ``queue``; True when that changed something."""
        ...


class PausedQueues:
    """A worker's cached view of the pause set: :meth:`active` filters a fetch's queues.

    Thread-safe. When the store cannot be read the last known set is kept (a store outage is the
    fetch's own problem to report), so an outage never un-pauses a queue.
    """

    def __init__(
        self,
        read: Callable[[], frozenset[str]],
        *,
        refresh: float = PAUSE_REFRESH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._refresh = refresh
        self._clock = clock
        self._lock = threading.Lock()
        self._paused: frozenset[str] = frozenset()
        self._read_at: float | None = None

    def paused(self) -> frozenset[str]:
        now = self._clock()
        with self._lock:
            if self._read_at is not None and now - self._read_at < self._refresh:
                return self._paused
            self._read_at = now
        try:
            current = self._read()
        except Exception as exc:  # keep the last known set; the fetch reports the outage
            log.debug("paused queues not read: %s", exc)
            return self._paused
        with self._lock:
            self._paused = current
        return current

    def active(self, queues: Sequence[str]) -> list[str]:
        """``queues`` without the paused ones, in their order."""
        paused = self.paused()
        if not paused:
            return list(queues)
        return [queue for queue in queues if queue not in paused]

    def forget(self) -> None:
        """Read the store again at the next call (after a resume seen by this process)."""
        with self._lock:
            self._read_at = None
