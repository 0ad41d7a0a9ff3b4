"""The messages of the event channel: one frozen dataclass per event and command.

docs/operations/lifecycle.md ("The event channel") describes every message and field; the wire
form is workerkit.events.wire's. Each class's ``__init__`` sets its slots directly: events are
built per job in the worker and per line in the supervisor (see :func:`_set_slots_directly`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, NamedTuple

if TYPE_CHECKING:
    from workerkit.engines.presence import Presence

__all__ = (
    "COMMANDS",
    "EVENT_TYPES",
    "IDEMPOTENCY_OUTCOMES",
    "OUTCOMES",
    "PAYLOAD_REFUSALS",
    "SCHEDULE_FIRE_OUTCOMES",
    "BadMessage",
    "CheckpointSaved",
    "Command",
    "CommandMessage",
    "Event",
    "EventType",
    "FinishedJob",
    "Heartbeat",
    "Hello",
    "Idempotency",
    "IdempotencyOutcome",
    "JobFinished",
    "JobHeartbeat",
    "JobOutcome",
    "JobPrefetched",
    "JobStarted",
    "JobsFinished",
    "Message",
    "Outcome",
    "PayloadRefusal",
    "PayloadRefused",
    "PrefetchReturned",
    "PublishPresence",
    "QueueStats",
    "Release",
    "RequestStop",
    "ScheduleFireOutcome",
    "ScheduleFired",
    "SchedulerLeadership",
    "StoreHealth",
    "WorkerReady",
    "WorkerStopping",
)

EventType = Literal[
    "hello",
    "worker_ready",
    "heartbeat",
    "store_health",
    "queue_stats",
    "job_started",
    "job_prefetched",
    "prefetch_returned",
    "job_heartbeat",
    "checkpoint_saved",
    "idempotency",
    "job_finished",
    "jobs_finished",
    "worker_stopping",
    "payload_refused",
    "scheduler_leadership",
    "schedule_fired",
]
EVENT_TYPES: Final[frozenset[str]] = frozenset(EventType.__args__)  # type: ignore[attr-defined]

Outcome = Literal[
    "succeeded",  # ran to completion and was acknowledged
    "failed",  # failed for good (attempts exhausted, or a permanent error such as an unknown task)
    "retried",  # failed and was scheduled to run again
    "released",  # handed back to the queue, checkpoint kept, attempt not consumed
    "skipped_duplicate",  # an idempotency key said it already ran; the stored result was replayed
    "deferred",  # another live attempt holds its idempotency key; back later, attempt not consumed
    "timed_out",  # exceeded its job timeout
    "lease_lost",  # another worker owns the job now; this attempt's result was fenced out
]
OUTCOMES: Final[frozenset[str]] = frozenset(Outcome.__args__)  # type: ignore[attr-defined]
#: A settled job's outcome as decoded: one the sender may not name is read as ``unknown``.
JobOutcome = Literal[Outcome, "unknown"]

#: The ``outcome`` of an ``idempotency`` event (workerkit.idempotency's decisions).
IdempotencyOutcome = Literal["claimed", "replayed", "deferred", "taken_over", "mismatched"]
IDEMPOTENCY_OUTCOMES: Final[frozenset[str]] = frozenset(IdempotencyOutcome.__args__)  # type: ignore[attr-defined]

#: Why a job's payload was refused (``payload_refused``): a pickled payload and a worker on JSON,
#: a global that safe-pickle does not admit, or any other payload that does not decode.
PayloadRefusal = Literal["pickled", "refused_global", "undecodable"]
PAYLOAD_REFUSALS: Final[frozenset[str]] = frozenset(PayloadRefusal.__args__)  # type: ignore[attr-defined]

#: What one fire attempt of the scheduler did (the values of ``FireOutcome``); read as ``unknown``
#: when a sender names another, so the metric's label set stays bounded.
ScheduleFireOutcome = Literal["fired", "already_fired", "not_leader", "stale", "paused", "unknown"]
SCHEDULE_FIRE_OUTCOMES: Final[frozenset[str]] = frozenset(ScheduleFireOutcome.__args__)  # type: ignore[attr-defined]

Command = Literal["request_stop", "release", "presence"]
COMMANDS: Final[frozenset[str]] = frozenset(Command.__args__)  # type: ignore[attr-defined]

#: A message as a plain dict (what a command handler receives with the command's name).
Message = dict[str, Any]


# --- events (a process -> its supervisor) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """A process connected (every connection's first event); ``pid`` is the sender's."""

    name: ClassVar[EventType] = "hello"
    role: str | None = None
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """The engine's worker consumes jobs; ``worker_id``: the id it claims jobs under, if any."""

    name: ClassVar[EventType] = "worker_ready"
    engine: str | None = None
    queues: tuple[str, ...] = ()
    concurrency: int | None = None
    worker_id: str | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The worker loop is alive; ``ts`` is the sender's wall time."""

    name: ClassVar[EventType] = "heartbeat"
    running: int | None = None
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """Whether the worker reached its broker or store; ``reason`` is one line, never a secret."""

    name: ClassVar[EventType] = "store_health"
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Ready jobs, and the age of the oldest one in seconds, per queue."""

    name: ClassVar[EventType] = "queue_stats"
    depth: Mapping[str, float] = dataclasses.field(default_factory=dict)
    oldest_ready_age: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JobStarted:
    """A delivery is in flight; ``delivery`` is what the engine needs to release it."""

    name: ClassVar[EventType] = "job_started"
    job_id: str
    task: str | None = None
    queue: str | None = None
    attempt: int | None = None
    delivery: Mapping[str, Any] | None = None
    queued_for: float | None = None


@dataclass(frozen=True, slots=True)
class JobPrefetched:
    """A delivery is held for the next free slot, not started (the sql worker's prefetch);
    ``delivery`` is what the engine needs to put it back if the worker dies first."""

    name: ClassVar[EventType] = "job_prefetched"
    job_id: str
    queue: str | None = None
    delivery: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PrefetchReturned:
    """A prefetched delivery was put back to its queue (or its lease was lost) unstarted."""

    name: ClassVar[EventType] = "prefetch_returned"
    job_id: str


@dataclass(frozen=True, slots=True)
class JobHeartbeat:
    """A running job's lease was extended."""

    name: ClassVar[EventType] = "job_heartbeat"
    job_id: str


@dataclass(frozen=True, slots=True)
class CheckpointSaved:
    """A running job saved a checkpoint (no task or queue: those of its ``job_started``)."""

    name: ClassVar[EventType] = "checkpoint_saved"
    job_id: str
    task: str | None = None
    queue: str | None = None


@dataclass(frozen=True, slots=True)
class Idempotency:
    """An idempotency key was looked up at the start of a run (``queue`` "" outside a job)."""

    name: ClassVar[EventType] = "idempotency"
    task: str
    queue: str
    outcome: IdempotencyOutcome


@dataclass(frozen=True, slots=True)
class JobFinished:
    """A delivery was settled (no task or queue: those of its ``job_started``)."""

    name: ClassVar[EventType] = "job_finished"
    job_id: str
    task: str | None = None
    queue: str | None = None
    outcome: JobOutcome = "unknown"
    duration: float | None = None


class FinishedJob(NamedTuple):
    """One job of a :class:`JobsFinished` batch, in its wire order (a tuple: one per job)."""

    job_id: str
    task: str | None
    queue: str | None
    outcome: JobOutcome
    duration: float | None


@dataclass(frozen=True, slots=True)
class JobsFinished:
    """Several ``job_finished`` at once, in the order they finished (Celery batches them)."""

    name: ClassVar[EventType] = "jobs_finished"
    jobs: tuple[FinishedJob, ...]


@dataclass(frozen=True, slots=True)
class WorkerStopping:
    """The worker stopped fetching, whether or not it was asked to."""

    name: ClassVar[EventType] = "worker_stopping"
    running: int | None = None


@dataclass(frozen=True, slots=True)
class PayloadRefused:
    """A dequeued job's payload could not be decoded: it was failed with the reason, never run."""

    name: ClassVar[EventType] = "payload_refused"
    job_id: str
    queue: str
    reason: PayloadRefusal


@dataclass(frozen=True, slots=True)
class SchedulerLeadership:
    """The scheduler process gained (``leading``) or lost/gave up leadership, under ``epoch``."""

    name: ClassVar[EventType] = "scheduler_leadership"
    leading: bool
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class ScheduleFired:
    """One fire attempt of a schedule ended; ``delay``: seconds after its fire time."""

    name: ClassVar[EventType] = "schedule_fired"
    schedule: str
    outcome: ScheduleFireOutcome = "unknown"
    reason: str = ""
    delay: float | None = None


Event = (
    Hello
    | WorkerReady
    | Heartbeat
    | StoreHealth
    | QueueStats
    | JobStarted
    | JobPrefetched
    | PrefetchReturned
    | JobHeartbeat
    | CheckpointSaved
    | Idempotency
    | JobFinished
    | JobsFinished
    | WorkerStopping
    | PayloadRefused
    | SchedulerLeadership
    | ScheduleFired
)


# --- commands (the supervisor -> its processes) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestStop:
    """The drain deadline: every running job's ``stop_requested`` turns true."""

    name: ClassVar[Command] = "request_stop"


@dataclass(frozen=True, slots=True)
class Release:
    """The interrupt deadline: interrupt what still runs and release it to its queue."""

    name: ClassVar[Command] = "release"


@dataclass(frozen=True, slots=True)
class PublishPresence:
    """The supervisor's record of its worker, for the worker's main process to write to its
    engine's store (the dashboard's workers page); sent to that process only."""

    name: ClassVar[Command] = "presence"
    presence: Presence


CommandMessage = RequestStop | Release | PublishPresence


@dataclass(frozen=True, slots=True)
class BadMessage:
    """A line that is not a valid event or command, and why (the decoder's only failure)."""

    reason: str


# --- construction -------------------------------------------------------------------------------

_FACTORY: Final = object()


def _set_slots_directly(cls: type[Any]) -> None:
    """Give an event class an ``__init__`` that sets its slots directly (same signature).

    The one dataclasses writes for a frozen class calls ``object.__setattr__`` per field, which
    doubles the cost of building an event: a worker builds two per job, the supervisor one per
    line it reads. Like dataclasses, it is compiled from the class's own field names.
    """
    scope: dict[str, Any] = {"FACTORY": _FACTORY}
    params, body = ["self"], []
    for f in dataclasses.fields(cls):
        scope[f"set_{f.name}"] = getattr(cls, f.name).__set__
        if f.default_factory is not dataclasses.MISSING:
            scope[f"new_{f.name}"] = f.default_factory
            params.append(f"{f.name}=FACTORY")
            body.append(f"if {f.name} is FACTORY: {f.name} = new_{f.name}()")
        elif f.default is not dataclasses.MISSING:
            scope[f"default_{f.name}"] = f.default
            params.append(f"{f.name}=default_{f.name}")
        else:
            params.append(f.name)
        body.append(f"set_{f.name}(self, {f.name})")
    source = f"def __init__({', '.join(params)}):\n    " + "\n    ".join(body)
    exec(source, scope)  # noqa: S102
    scope["__init__"].__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = scope["__init__"]


for _event_class in Event.__args__:
    _set_slots_directly(_event_class)
del _event_class
