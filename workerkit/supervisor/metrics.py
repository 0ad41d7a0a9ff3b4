"""Prometheus metrics, aggregated in the supervisor from the events of every job-running process.

Every family has the ``workerkit_`` prefix, measures seconds, and uses bounded labels only
(``engine``, ``queue``, ``task``, ``outcome``, ``state``, ``reason``): never a job id. The
families live in the supervisor's own :class:`~prometheus_client.CollectorRegistry`, not the
global one, so two supervisors in one test process do not collide and ``/metrics`` shows only
workerkit's families.
The reference is docs/reference/metrics.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from workerkit.events import (
    IDEMPOTENCY_OUTCOMES,
    BadMessage,
    CheckpointSaved,
    Event,
    Heartbeat,
    Idempotency,
    JobFinished,
    JobsFinished,
    JobStarted,
    PayloadRefused,
    QueueStats,
    ScheduleFired,
    SchedulerLeadership,
    StoreHealth,
)

__all__ = (
    "DRAIN_BUCKETS",
    "DURATION_BUCKETS",
    "FIRE_DELAY_BUCKETS",
    "IDEMPOTENCY_OUTCOMES",
    "SHUTDOWN_OUTCOMES",
    "STATES",
    "SupervisorMetrics",
)

log = logging.getLogger(__name__)

#: Job durations and queue waits: from a fast job to an hour-long backfill.
DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
#: Drains: from an idle worker (well under a second) to a long grace period.
DRAIN_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
#: A scheduler's fire delay: on time (a few ms), a standby's fire (its delay), a catch-up.
FIRE_DELAY_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    60.0,
    300.0,
    3600.0,
)
STATES: Final = ("starting", "ready", "draining", "releasing", "stopped")
SHUTDOWN_OUTCOMES: Final = ("clean", "released", "forced", "crashed")

_UNKNOWN = "unknown"


def _label(value: str | None) -> str:
    return value or _UNKNOWN


class SupervisorMetrics:
    """The supervisor's metric families, and how each event moves them."""

    def __init__(
        self, engine: str, registry: CollectorRegistry | None = None, *, scheduler: bool = False
    ) -> None:
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        self._job_families(self.registry)
        self._worker_families(self.registry)
        #: ``workerkit scheduler``: the scheduler's families (a worker's /metrics has none).
        self.scheduler = scheduler
        self._leading: bool | None = None
        if scheduler:
            self._scheduler_families(self.registry)
        self._running: dict[str, tuple[str, str]] = {}  # job id -> (queue, task)
        # (family, label values) -> child: prometheus_client's labels() validates and locks on
        # every call, and the per-job families are moved for every job.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        for outcome in SHUTDOWN_OUTCOMES:
            self.shutdowns.labels(engine, outcome)
        self.set_state("starting")

    def _job_families(self, r: CollectorRegistry) -> None:
        """The families that jobs' events move."""
        self.jobs = Counter(
            "workerkit_jobs",
            "Jobs settled by this worker, by outcome.",
            ("engine", "queue", "task", "outcome"),
            registry=r,
        )
        self.job_duration = Histogram(
            "workerkit_job_duration_seconds",
            "How long one attempt of a job ran, from start to settlement.",
            ("engine", "queue", "task"),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "workerkit_queue_wait_seconds",
            "How long a job waited in its queue, from runnable to started.",
            ("engine", "queue", "task"),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.jobs_in_progress = Gauge(
            "workerkit_jobs_in_progress",
            "Jobs running now.",
            ("engine", "queue", "task"),
            registry=r,
        )
        self.checkpoints = Counter(
            "workerkit_checkpoints_saved",
            "Checkpoints saved by running jobs.",
            ("engine", "queue", "task"),
            registry=r,
        )
        self.idempotency = Counter(
            "workerkit_idempotency",
            "Idempotency-key decisions when a run starts: claimed, replayed, deferred, "
            "taken_over, mismatched.",
            ("engine", "queue", "task", "outcome"),
            registry=r,
        )
        self.payloads_refused = Counter(
            "workerkit_payloads_refused",
            "Dequeued jobs whose payload could not be decoded (failed with the reason, never "
            "run), by reason: pickled, refused_global, undecodable.",
            ("engine", "queue", "reason"),
            registry=r,
        )

    def _worker_families(self, r: CollectorRegistry) -> None:
        """The families of the worker, its queues and the supervisor's own lifecycle."""
        self.worker_state = Gauge(
            "workerkit_worker_state",
            "The supervisor's lifecycle state: 1 for the current state, 0 for the others.",
            ("engine", "state"),
            registry=r,
        )
        self.drain_duration = Histogram(
            "workerkit_drain_duration_seconds",
            "From the first SIGTERM (or the worker's own stop, or its crash) to the exit.",
            ("engine",),
            buckets=DRAIN_BUCKETS,
            registry=r,
        )
        self.shutdowns = Counter(
            "workerkit_shutdowns",
            "Supervisor shutdowns by outcome: clean, released, forced (the worker had to be "
            "killed) or crashed (the worker exited unexpectedly).",
            ("engine", "outcome"),
            registry=r,
        )
        self.queue_depth = Gauge(
            "workerkit_queue_depth",
            "Jobs ready to run in each queue, as last reported by the worker.",
            ("engine", "queue"),
            registry=r,
        )
        self.queue_oldest_age = Gauge(
            "workerkit_queue_oldest_job_age_seconds",
            "Age of the oldest ready job in each queue, as last reported by the worker.",
            ("engine", "queue"),
            registry=r,
        )
        self.last_heartbeat = Gauge(
            "workerkit_worker_last_heartbeat_timestamp_seconds",
            "Unix time of the worker's last heartbeat.",
            ("engine",),
            registry=r,
        )
        self.store_up = Gauge(
            "workerkit_store_up",
            "1 when the worker last found its broker or store reachable, else 0.",
            ("engine",),
            registry=r,
        )
        self.bad_messages = Counter(
            "workerkit_bad_messages",
            "Lines on the event channel that were not a valid event (each is logged).",
            ("engine",),
            registry=r,
        ).labels(self.engine)

    def _scheduler_families(self, r: CollectorRegistry) -> None:
        """The families of ``workerkit scheduler`` (docs/concepts/scheduler.md)."""
        self.scheduler_leader = Gauge(
            "workerkit_scheduler_leader",
            "1 while this scheduler replica leads (fires on time), else 0.",
            ("engine",),
            registry=r,
        ).labels(self.engine)
        self.scheduler_fires = Counter(
            "workerkit_scheduler_fires",
            "Fire attempts by schedule and outcome: fired, already_fired (another replica "
            "recorded it first), not_leader, stale, paused.",
            ("engine", "schedule", "outcome"),
            registry=r,
        )
        self.scheduler_fire_delay = Histogram(
            "workerkit_scheduler_fire_delay_seconds",
            "How late each fire was enqueued, after its fire time (fired outcomes only).",
            ("engine",),
            buckets=FIRE_DELAY_BUCKETS,
            registry=r,
        ).labels(self.engine)
        self.scheduler_leader_changes = Counter(
            "workerkit_scheduler_leader_changes",
            "Times this replica gained or lost leadership.",
            ("engine",),
            registry=r,
        ).labels(self.engine)
        self.scheduler_leader.set(0.0)

    def _scheduler_event(self, event: SchedulerLeadership | ScheduleFired) -> None:
        if not self.scheduler:
            return
        if isinstance(event, SchedulerLeadership):
            if event.leading != self._leading:
                if event.leading or self._leading:  # not the first "standby" report
                    self.scheduler_leader_changes.inc()
                self._leading = event.leading
            self.scheduler_leader.set(1.0 if event.leading else 0.0)
            return
        self._series(self.scheduler_fires, self.engine, event.schedule, event.outcome).inc()
        if event.outcome == "fired" and event.delay is not None:
            self.scheduler_fire_delay.observe(event.delay)

    # --- supervisor-side ---------------------------------------------------------------------

    def set_state(self, state: str) -> None:
        """Make ``state`` the one current state (a one-hot gauge)."""
        for name in STATES:
            self.worker_state.labels(self.engine, name).set(1.0 if name == state else 0.0)

    def shutdown(self, outcome: str, drain_duration: float | None) -> None:
        """Count the supervisor's shutdown and, when a drain happened, how long it took."""
        self.shutdowns.labels(self.engine, outcome).inc()
        if self.scheduler:  # whatever its last report said, an exiting scheduler leads no more
            self.scheduler_leader.set(0.0)
        if drain_duration is not None:
            self.drain_duration.labels(self.engine).observe(max(0.0, drain_duration))

    def abandon(self, job_ids: Iterable[str], outcome: str) -> None:
        """Settle jobs whose process died: the supervisor released them (or could not)."""
        for job_id in job_ids:
            running = self._running.pop(job_id, None)
            if running is None:
                continue
            queue, task = running
            self.jobs_in_progress.labels(self.engine, queue, task).dec()
            self.jobs.labels(self.engine, queue, task, outcome).inc()

    # --- events from job-running processes ---------------------------------------------------

    def _series(self, family: Any, *values: str) -> Any:
        """``family.labels(*values)``, looked up once per label set."""
        key = (family, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*values)
        return child

    def apply(self, event: Event | BadMessage, *, wall_time: float | None = None) -> None:
        """Move the families for one event (already validated by ``workerkit.events.decode``).

        ``wall_time`` stamps a heartbeat that carries no time of its own (default: now).
        """
        match event:
            case JobsFinished(jobs=jobs):
                for job_id, task, queue, outcome, duration in jobs:
                    self._finish(job_id, _label(queue), _label(task), outcome, duration)
            case JobStarted():
                self._job_started(event)
            case JobFinished(job_id=job_id, outcome=outcome, duration=duration):
                queue, task = self._queue_task(job_id, event.queue, event.task)
                self._finish(job_id, queue, task, outcome, duration)
            case CheckpointSaved(job_id=job_id):
                queue, task = self._queue_task(job_id, event.queue, event.task)
                self._series(self.checkpoints, self.engine, queue, task).inc()
            case Heartbeat(ts=ts):
                if ts is None:
                    ts = time.time() if wall_time is None else wall_time
                self.last_heartbeat.labels(self.engine).set(ts)
            case StoreHealth(ok=ok):
                self.store_up.labels(self.engine).set(1.0 if ok else 0.0)
            case QueueStats(depth=depth, oldest_ready_age=oldest):
                for queue, count in depth.items():
                    self.queue_depth.labels(self.engine, _label(queue)).set(count)
                for queue, age in oldest.items():
                    self.queue_oldest_age.labels(self.engine, _label(queue)).set(age)
            case Idempotency(task=task, queue=queue, outcome=outcome):
                self.idempotency.labels(self.engine, _label(queue), _label(task), outcome).inc()
            case PayloadRefused(queue=queue, reason=reason):
                self._series(self.payloads_refused, self.engine, _label(queue), reason).inc()
            case SchedulerLeadership() | ScheduleFired():
                self._scheduler_event(event)
            case BadMessage():
                self.bad_messages.inc()

    def _queue_task(self, job_id: str, queue: str | None, task: str | None) -> tuple[str, str]:
        """The labels of a job's event: its own, or those its job_started had."""
        if queue is None and task is None:
            known = self._running.get(job_id)
            if known is not None:
                return known
        return _label(queue), _label(task)

    def _job_started(self, event: JobStarted) -> None:
        job_id = event.job_id
        queue, task = _label(event.queue), _label(event.task)
        previous = self._running.pop(job_id, None)
        if previous is not None:  # a start without a finish: do not count it twice
            self._series(self.jobs_in_progress, self.engine, *previous).dec()
        self._running[job_id] = (queue, task)
        self._series(self.jobs_in_progress, self.engine, queue, task).inc()
        if event.queued_for is not None:
            self._series(self.queue_wait, self.engine, queue, task).observe(event.queued_for)

    def _finish(
        self, job_id: str, queue: str, task: str, outcome: str, duration: float | None
    ) -> None:
        """One job settled (``queue`` and ``task`` already label values)."""
        running = self._running.pop(job_id, None)
        if running is not None:
            self._series(self.jobs_in_progress, self.engine, *running).dec()
        self._series(self.jobs, self.engine, queue, task, outcome).inc()
        if duration is not None:
            self._series(self.job_duration, self.engine, queue, task).observe(duration)
