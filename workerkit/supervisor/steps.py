"""The lifecycle machine's vocabulary: the inputs it takes and the actions it returns.

Plain frozen dataclasses, no behaviour; :mod:`workerkit.supervisor.lifecycle` (the machine) and
:mod:`workerkit.supervisor.runner` (which feeds it and executes the actions) share them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from workerkit.events import CommandMessage

__all__ = (
    "Action",
    "BroadcastCommand",
    "Exit",
    "Input",
    "JobFinished",
    "JobStarted",
    "KillChild",
    "Log",
    "ReleaseCompleted",
    "ReleaseInFlight",
    "ShutdownOutcome",
    "SignalChild",
    "SignalReceived",
    "StartChild",
    "Tick",
    "WorkerExited",
    "WorkerReady",
    "WorkerStopping",
)


ShutdownOutcome = Literal["clean", "released", "forced", "crashed"]


# --- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    """The engine's worker consumes jobs (event ``worker_ready``)."""

    now: float


@dataclass(frozen=True)
class WorkerStopping:
    """The worker stopped fetching (event ``worker_stopping``), whether or not we asked it to."""

    now: float


@dataclass(frozen=True)
class SignalReceived:
    """The supervisor received SIGTERM, SIGINT or SIGHUP (a drain), or SIGQUIT (release now)."""

    signum: int
    now: float


@dataclass(frozen=True)
class Tick:
    """The clock moved on; deadlines are checked."""

    now: float


@dataclass(frozen=True)
class JobStarted:
    """A delivery is in flight (event ``job_started``); ``delivery`` is its ``Delivery.ref()``."""

    job_id: str
    delivery: Mapping[str, Any]


@dataclass(frozen=True)
class JobFinished:
    """A delivery was settled (event ``job_finished``) with ``outcome``."""

    job_id: str
    outcome: str


@dataclass(frozen=True)
class WorkerExited:
    """The worker process exited; ``returncode`` is negative for a signal, as in subprocess."""

    returncode: int
    now: float


@dataclass(frozen=True)
class ReleaseCompleted:
    """The supervisor's own release of in-flight deliveries finished (``error`` when it failed)."""

    released: int
    now: float
    error: str | None = None


Input = (
    WorkerReady
    | WorkerStopping
    | SignalReceived
    | Tick
    | JobStarted
    | JobFinished
    | WorkerExited
    | ReleaseCompleted
)


# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignalChild:
    """Send ``signum`` to the worker process, by its pid (never to a process group)."""

    signum: int


@dataclass(frozen=True)
class BroadcastCommand:
    """Send ``command`` to every connected process."""

    command: CommandMessage


@dataclass(frozen=True)
class StartChild:
    """Start a new worker process (the last one crashed and is restarted)."""


@dataclass(frozen=True)
class KillChild:
    """SIGKILL the worker process and whatever it started."""


@dataclass(frozen=True)
class ReleaseInFlight:
    """Release these deliveries through the engine, then report back with ReleaseCompleted.

    ``crashed``: the worker exited unasked, so the jobs keep the attempt (the job may be what
    crashed it); after a kill at the shutdown deadline they get it back.
    """

    refs: tuple[Mapping[str, Any], ...]
    crashed: bool = False


@dataclass(frozen=True)
class Log:
    """Write one structured log line with a stable ``event`` name."""

    event: str
    message: str
    level: int = logging.INFO
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Exit:
    """Stop the supervisor with ``code``; ``outcome`` and ``drain_duration`` are for metrics."""

    code: int
    outcome: ShutdownOutcome
    drain_duration: float | None


Action = SignalChild | BroadcastCommand | KillChild | ReleaseInFlight | Log | Exit | StartChild
