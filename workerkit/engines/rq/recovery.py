"""Crash recovery: settling attempts whose process is gone, and the scan that finds them.

Every live worker scans its queues about once a second for started attempts whose lease is gone
and requeues them (or fails a job out of attempts); the supervisor releases the attempts of a
worker it killed through the same :class:`Recovery`. The lease lives V minus one scan interval,
so a dead pod's job is back in its queue within V.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import redis
import redis.exceptions
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.utils import now, utcformat

from workerkit.engines.rq.jobs import encode_state, wk_state
from workerkit.engines.rq.leases import SETTLE_TTL_MS, AttemptKeys, Leases, lease_key, started_key
from workerkit.engines.rq.tasks import DEFAULT_MAX_ATTEMPTS

if TYPE_CHECKING:
    from workerkit.events import Outcome
    from workerkit.settings import Settings

__all__ = ("RECOVERY_SCAN_INTERVAL", "BadRef", "Recovery", "lease_ttl", "scan_interval")

log = logging.getLogger("workerkit.engines.rq")

#: How often live workers look for abandoned attempts (at most; less when H is shorter).
RECOVERY_SCAN_INTERVAL: Final = 1.0


def scan_interval(settings: Settings) -> float:
    """How often the recovery scan runs: every second, or every H when that is shorter."""
    return max(0.05, min(RECOVERY_SCAN_INTERVAL, settings.effective_heartbeat_interval))


def lease_ttl(settings: Settings) -> float:
    """The lease TTL: V minus one scan interval, so that a dead attempt is requeued within V."""
    v = settings.visibility_timeout if settings.visibility_timeout is not None else 30.0
    return max(v - scan_interval(settings), settings.effective_heartbeat_interval * 1.5, 0.5)


class BadRef(ValueError):
    """A delivery ref that does not name an attempt (one of its fields is missing)."""


class Recovery:
    """Settling attempts whose process is gone: crash recovery and releases by ref.

    Used by every live worker (the recovery scan, a work horse that died) and by the supervisor
    (``RqEngine.release_in_flight``). Every change goes through the fenced scripts of
    :class:`~workerkit.engines.rq.leases.Leases`.
    """

    def __init__(
        self, connection: redis.Redis[Any], leases: Leases, job_class: type[Job], serializer: Any
    ) -> None:
        self.connection = connection
        self.leases = leases
        self.job_class = job_class
        self.serializer = serializer

    def fetch(self, job_id: str) -> Job | None:
        try:
            return self.job_class.fetch(
                job_id, connection=self.connection, serializer=self.serializer
            )
        except NoSuchJobError:
            return None

    def release(self, keys: AttemptKeys, accepted: Sequence[str], *, give_back: bool) -> bool:
        """Requeue at the front; the attempt is given back when ``give_back`` (a deploy)."""
        state: bytes | None = None
        if give_back:
            job = self.fetch(keys.job_id)
            if job is not None:
                wk = wk_state(job)
                wk["attempts"] = max(0, int(wk.get("attempts", 1)) - 1)
                state = encode_state(wk)
        return self.leases.requeue(keys, accepted, state)

    def release_ref(self, ref: Mapping[str, Any], *, crashed: bool = False) -> bool:
        """Release by :meth:`AttemptKeys.ref`, from another process; whether it was released.

        Whatever state the lease is in (running, settling, being released, or already
        expired), the attempt's process is gone, so its job may go back to the queue: at the
        front, with its checkpoint. ``crashed``: the attempt stays consumed and a job out of
        attempts is failed with the reason; otherwise (a deploy) it is given back.
        """
        try:
            keys = AttemptKeys(str(ref["job_id"]), str(ref["token"]), str(ref["queue"]))
        except KeyError as exc:
            raise BadRef(repr(exc)) from exc  # logged as the KeyError's repr, as before
        accepted = ["run", "settle", "release", "none"]
        if crashed:
            return self.recover(keys, accepted, "its worker process exited") is not None
        return self.release(keys, accepted, give_back=True)

    def recover(self, keys: AttemptKeys, accepted: Sequence[str], reason: str) -> Outcome | None:
        """After a crash: requeue ("retried"), or fail a job out of attempts ("failed").

        None when the attempt was not ours to recover (settled, or another attempt owns it).
        """
        job = self.fetch(keys.job_id)
        if job is None:
            self._forget(keys, accepted)
            return None
        wk = wk_state(job)
        attempts = int(wk.get("attempts", 1))
        max_attempts = int(wk.get("max_attempts", DEFAULT_MAX_ATTEMPTS))
        if attempts < max_attempts:
            if not self.leases.requeue(keys, accepted, None):
                return None
            log.warning(
                "job requeued after its attempt was abandoned",
                extra={
                    "event": "job_recovered",
                    "job_id": keys.job_id,
                    "queue": keys.queue,
                    "attempt": attempts,
                    "max_attempts": max_attempts,
                    "reason": reason,
                },
            )
            return "retried"
        # Take the attempt over ("recover", a state its own settle never accepts) before RQ's
        # failure bookkeeping, so that no other recovering worker fails it too and a settle the
        # attempt retries after an outage cannot land; if we die half-way, the lease expires
        # and the next scan finishes the job's failure.
        if not self.leases.transition(keys, accepted, "recover", SETTLE_TTL_MS):
            return None
        error = (
            f"workerkit: the job's worker died {attempts} times (max_attempts={max_attempts}); "
            f"last time: {reason}"
        )
        with self.connection.pipeline() as pipeline:
            job.set_status(JobStatus.FAILED, pipeline=pipeline)
            job._handle_failure(error, pipeline, worker_name="")
            pipeline.zrem(f"rq:wip:{keys.queue}", keys.member)
            pipeline.delete(f"rq:execution:{keys.job_id}:{keys.token}")
            pipeline.zrem(f"rq:executions:{keys.job_id}", keys.token)
            pipeline.delete(lease_key(keys.job_id))
            pipeline.zrem(started_key(keys.queue), keys.member)
            pipeline.execute()
        with contextlib.suppress(Exception):
            Queue(
                keys.queue, connection=self.connection, serializer=self.serializer
            ).enqueue_dependents(job)
        log.error(
            "job failed: its worker died with no attempts left",
            extra={
                "event": "job_lease_exhausted",
                "job_id": keys.job_id,
                "queue": keys.queue,
                "error": error,
            },
        )
        return "failed"

    def _forget(self, keys: AttemptKeys, accepted: Sequence[str]) -> None:
        # The job hash is gone (deleted, or its TTL ran out): nothing to requeue; drop the member
        # through the fenced script, with an empty queue push avoided by removing it directly.
        if self.leases.transition(keys, accepted, "recover", SETTLE_TTL_MS):
            with self.connection.pipeline() as pipeline:
                pipeline.zrem(f"rq:wip:{keys.queue}", keys.member)
                pipeline.delete(lease_key(keys.job_id))
                pipeline.zrem(started_key(keys.queue), keys.member)
                pipeline.execute()

    def scan(self, queues: Sequence[str], owner: str, every: float) -> int:
        """Requeue (or fail) abandoned attempts of ``queues``; return how many.

        One scanner per queue per interval (``owner`` takes the queue's scan lock); due
        deferred jobs of the queues are put back too (:meth:`Leases.promote`).
        """
        recovered = 0
        for queue in queues:
            try:
                if not self.leases.try_scan_lock(queue, owner, every * 0.9):
                    continue
                for keys in self.leases.abandoned(queue):
                    if self.recover(keys, ["none"], "its lease expired (worker gone)"):
                        recovered += 1
                # Deferred jobs come back through workerkit's own workers, so that they do not
                # depend on RQ's scheduler (off unless --with-scheduler) running somewhere.
                self.leases.promote(queue, utcformat(now()))
            except redis.exceptions.RedisError as exc:
                log.warning(
                    "recovery scan failed",
                    extra={"event": "recovery_scan_failed", "error": str(exc)},
                )
        return recovered
