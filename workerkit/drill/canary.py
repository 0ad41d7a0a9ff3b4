"""The canary job: ``workerkit.canary``, registered by every workerkit worker.

One body for every engine (:func:`run_canary`); each engine's worker registers it under
:data:`CANARY_TASK` without user code (the sql worker in its app's registry, the celery worker on
the Celery app it wraps, rq by import path: :func:`canary`). A canary records its start and its
end in the engine's store (:mod:`workerkit.drill.records`). Kinds: ``short`` (milliseconds),
``long`` (``long_seconds`` of work, checkpointed: it releases itself at a stop request and the
next attempt resumes), ``flaky`` (fails its first attempt; the engine's own retry runs it
again) and ``stubborn`` (long, never checkpoints, ignores stop requests: what a job that does
not cooperate does to a rollout). A canary is idempotent, the way users' jobs should be: its
completion and its "done" mark are one atomic write, and a run that finds its canary done (a
redelivery after a lost acknowledgement) records itself as ``redelivered`` and skips the body.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

from workerkit.drill.records import CanaryRun, RecordStore
from workerkit.errors import LeaseLost, ReleaseJob
from workerkit.job import current_job

if TYPE_CHECKING:
    from workerkit.app import App
    from workerkit.drill.report import Sent
    from workerkit.job import JobContext

__all__ = (
    "CANARY_TASK",
    "KINDS",
    "RQ_CANARY",
    "SHORT_SECONDS",
    "CanaryFailure",
    "canary",
    "canary_kwargs",
    "hostname",
    "register_celery",
    "register_rq",
    "register_sql",
    "run_canary",
)

#: The canary's task name on every engine.
CANARY_TASK: Final = "workerkit.canary"

#: The canary's import path, by which rq jobs name it (registered in the worker's RqApp).
RQ_CANARY: Final = "workerkit.drill.canary.canary"

KINDS: Final = ("short", "long", "flaky", "stubborn")

#: How long a short (and a flaky) canary works.
SHORT_SECONDS: Final = 0.005

#: A long canary's work step: how often it looks at its stop flag and offers a checkpoint.
_STEP: Final = 0.1

#: Attempts a canary gets (a flaky one needs two); retry backoff kept short so a drill ends.
MAX_ATTEMPTS: Final = 5
RETRY_BACKOFF: Final = 0.2


class CanaryFailure(RuntimeError):
    """A flaky canary's first attempt, failing by design so that the engine retries it."""


def canary_kwargs(item: Sent, drill_id: str, long_seconds: float) -> dict[str, Any]:
    """The canary's arguments for one sent canary (the same on every engine)."""
    return {
        "drill_id": drill_id,
        "seq": item.seq,
        "kind": item.kind,
        "enqueued_at": item.enqueued_at,
        "long_seconds": long_seconds,
    }


def hostname() -> str:
    """The pod's name (``HOSTNAME``, as Kubernetes sets it), else this host's name."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


def run_canary(
    records: RecordStore,
    *,
    drill_id: str,
    seq: int,
    kind: str,
    enqueued_at: float,
    long_seconds: float = 0.0,
) -> str:
    """One execution of a canary, recorded at its start and end; returns ``"ok"``. A canary
    already completed (delivered again: its worker died between the end and the ack) is recorded
    as ``redelivered``, in one write, and its body is not run again."""
    job = current_job()
    run = CanaryRun(
        drill_id=drill_id,
        run_id=uuid.uuid4().hex,
        seq=int(seq),
        kind=kind,
        attempt=job.attempt,
        hostname=hostname(),
        pid=os.getpid(),
        enqueued_at=float(enqueued_at),
        started_at=time.time(),
        resumed=job.checkpoint is not None,
    )
    if records.completed_before(drill_id, run.seq):
        records.started(replace(run, ended_at=time.time(), outcome="redelivered"))
        return "ok"
    records.started(run)
    outcome = "interrupted"
    try:
        _work(job, kind, float(long_seconds))
        outcome = "completed"
    except ReleaseJob:
        outcome = "released"
        raise
    except LeaseLost:
        outcome = "lease_lost"
        raise
    except CanaryFailure:
        outcome = "failed"
        raise
    finally:
        records.ended(run, time.time(), outcome)
    return "ok"


def _work(job: JobContext, kind: str, long_seconds: float) -> None:
    if kind == "short":
        time.sleep(SHORT_SECONDS)
    elif kind == "flaky":
        time.sleep(SHORT_SECONDS)
        if job.attempt <= 1:
            raise CanaryFailure("flaky canary: its first attempt fails by design")
    elif kind == "long":
        _long(job, long_seconds)
    elif kind == "stubborn":
        time.sleep(long_seconds)
    else:
        raise ValueError(f"unknown canary kind {kind!r}; one of {', '.join(KINDS)}")


def _long(job: JobContext, seconds: float) -> None:
    """``seconds`` of work in steps; the work done is the checkpoint, resumed from."""
    saved = job.checkpoint
    done = float(saved.get("done", 0.0)) if isinstance(saved, dict) else 0.0
    while done < seconds:
        if job.stop_requested:
            job.release({"done": done})
        step = min(_STEP, seconds - done)
        began = time.monotonic()
        job.wait_for_stop(step)
        done += time.monotonic() - began
        job.save_checkpoint({"done": done})


def canary(
    drill_id: str, seq: int, kind: str, enqueued_at: float, long_seconds: float = 0.0
) -> str:
    """The canary for engines that run a function by import path (rq); records in Redis."""
    return run_canary(
        _redis_records(),
        drill_id=drill_id,
        seq=seq,
        kind=kind,
        enqueued_at=enqueued_at,
        long_seconds=long_seconds,
    )


_STORES: dict[str, RecordStore] = {}


def _redis_records() -> RecordStore:
    """The Redis the rq job came from (the worker's own connection, whatever URL it was given)."""
    from rq import get_current_job

    from workerkit.drill.records import RedisRecords

    job = get_current_job()
    if job is None:  # called outside an rq worker
        from workerkit.settings import load_settings

        url = load_settings().redis_url
        return _cached(f"redis:{url}", lambda: RedisRecords.from_url(url))
    return RedisRecords(job.connection)


def _cached(key: str, make: Callable[[], RecordStore]) -> RecordStore:
    """One record store per process and store (a forked child makes its own)."""
    key = f"{os.getpid()}:{key}"
    store = _STORES.get(key)
    if store is None:
        store = _STORES[key] = make()
    return store


def register_sql(app: App) -> None:
    """Register :data:`CANARY_TASK` in a workerkit ``App`` (the sql worker does, at start)."""
    if CANARY_TASK in app.tasks:
        return

    def sql_canary(
        drill_id: str, seq: int, kind: str, enqueued_at: float, long_seconds: float = 0.0
    ) -> Any:
        from workerkit.drill.records import SqlRecords

        url = app.database_url
        return run_canary(
            _cached(f"sql:{url}", lambda: SqlRecords(url)),
            drill_id=drill_id,
            seq=seq,
            kind=kind,
            enqueued_at=enqueued_at,
            long_seconds=long_seconds,
        )

    app.task(
        name=CANARY_TASK,
        max_attempts=MAX_ATTEMPTS,
        retry_backoff=RETRY_BACKOFF,
        retry_backoff_max=1.0,
        checkpointed=True,
    )(sql_canary)


def register_rq(app: Any) -> None:
    """Allow :func:`canary` in an ``RqApp`` (the rq worker does, at start)."""
    if RQ_CANARY not in app.tasks:
        app.task(max_attempts=MAX_ATTEMPTS, checkpointed=True)(canary)


def register_celery(app: Any) -> None:
    """Register :data:`CANARY_TASK` on the Celery app workerkit wraps (its worker does, at
    start); records go to the app's broker (Redis). A flaky canary's failure is retried by
    Celery's own ``Task.retry``."""

    def celery_canary(
        task: Any,
        drill_id: str,
        seq: int,
        kind: str,
        enqueued_at: float,
        long_seconds: float = 0.0,
    ) -> Any:
        from workerkit.drill.records import RedisRecords

        url = str(task.app.conf.broker_url)
        try:
            return run_canary(
                _cached(f"redis:{url}", lambda: RedisRecords.from_url(url)),
                drill_id=drill_id,
                seq=seq,
                kind=kind,
                enqueued_at=enqueued_at,
                long_seconds=long_seconds,
            )
        except CanaryFailure as exc:
            raise task.retry(exc=exc, countdown=RETRY_BACKOFF, max_retries=MAX_ATTEMPTS) from exc

    app.task(name=CANARY_TASK, bind=True, workerkit_checkpointed=True)(celery_canary)
