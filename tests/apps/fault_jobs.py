"""Jobs of the fault suite (tests/faults) on the sql and rq engines; tests/apps/fault_celery.py
has the same jobs for Celery. Every run journals itself (``$E2E_JOURNAL``).

One line per mark: ``begin ID ATTEMPT PID TIME``, ``step ID N PID TIME`` (after each saved
checkpoint, or each tick of a job that keeps none) and ``end ID ATTEMPT PID TIME`` (the body ran
to its end), so the suite can tell from the jobs' own records how often each job completed and
whether two runs overlapped. A checkpointed step is journaled once its checkpoint was written:
a run fenced off writes no more marks.
"""

from __future__ import annotations

import os
import time

from tests.apps.journal import record
from workerkit.app import App
from workerkit.engines.rq import RqApp
from workerkit.idempotency import idempotent
from workerkit.job import current_job

__all__ = (
    "IDEM_EXPIRY",
    "gate_body",
    "long_body",
    "mark",
    "rq_app",
    "rq_gate",
    "rq_idem",
    "rq_long",
    "rq_short",
    "rq_tick",
    "short_body",
    "sql_app",
    "sql_gate",
    "sql_idem",
    "sql_long",
    "sql_short",
    "sql_tick",
    "tick_body",
)

sql_app = App()
rq_app = RqApp(modules=["tests.apps.fault_jobs"])

#: An idempotency key's in-progress expiry: far above a short job's run, short enough that a
#: key whose owner was cut off (by an outage) is taken over within the test.
IDEM_EXPIRY = 3.0


def mark(kind: str, job_id: str, value: object) -> None:
    record(f"{kind} {job_id} {value} {os.getpid()} {time.time():.6f}")


def short_body(job_id: str, seconds: float) -> str:
    attempt = current_job().attempt
    mark("begin", job_id, attempt)
    time.sleep(seconds)
    mark("end", job_id, attempt)
    return job_id


def gate_body(job_id: str, gate: str) -> str:
    """Runs until the file ``gate`` exists: the test decides when it ends (during an outage)."""
    attempt = current_job().attempt
    mark("begin", job_id, attempt)
    while not os.path.exists(gate):
        time.sleep(0.01)
    mark("end", job_id, attempt)
    return job_id


def tick_body(job_id: str, ticks: int, seconds: float) -> int:
    """``ticks`` steps journaled as they go, no checkpoint: stops (releases itself) only when
    asked, so it runs on exactly as long as its process believes it owns the job."""
    job = current_job()
    mark("begin", job_id, job.attempt)
    for tick in range(1, ticks + 1):
        if job.stop_requested:
            job.release()
        time.sleep(seconds)
        mark("step", job_id, tick)
    mark("end", job_id, job.attempt)
    return ticks


def long_body(job_id: str, steps: int, step_seconds: float) -> int:
    """``steps`` steps, a forced checkpoint after each; releases itself when asked to stop."""
    job = current_job()
    done = int(job.checkpoint or 0)
    mark("begin", job_id, job.attempt)
    while done < steps:
        if job.stop_requested:
            job.release(done)
        if job.wait_for_stop(step_seconds):
            continue  # asked to stop: release at the top of the loop
        done += 1
        job.save_checkpoint(done, force=True)
        mark("step", job_id, done)
    mark("end", job_id, job.attempt)
    return done


@sql_app.task(name="short", timeout=20)
def sql_short(job_id: str, seconds: float) -> str:
    return short_body(job_id, seconds)


@sql_app.task(name="idem", timeout=20)
@idempotent("fault:{job_id}", in_progress_expiry=IDEM_EXPIRY)
def sql_idem(job_id: str, seconds: float) -> str:
    return short_body(job_id, seconds)


@sql_app.task(name="gate", timeout=60)
def sql_gate(job_id: str, gate: str) -> str:
    return gate_body(job_id, gate)


@sql_app.task(name="tick", timeout=60)
def sql_tick(job_id: str, ticks: int, seconds: float) -> int:
    return tick_body(job_id, ticks, seconds)


@sql_app.task(name="long", timeout=60, checkpointed=True)
def sql_long(job_id: str, steps: int, step_seconds: float) -> int:
    return long_body(job_id, steps, step_seconds)


@rq_app.task(timeout=20)
def rq_short(job_id: str, seconds: float) -> str:
    return short_body(job_id, seconds)


@rq_app.task(timeout=20)
@idempotent("fault:{job_id}", in_progress_expiry=IDEM_EXPIRY)
def rq_idem(job_id: str, seconds: float) -> str:
    return short_body(job_id, seconds)


@rq_app.task(timeout=60)
def rq_gate(job_id: str, gate: str) -> str:
    return gate_body(job_id, gate)


@rq_app.task(timeout=60)
def rq_tick(job_id: str, ticks: int, seconds: float) -> int:
    return tick_body(job_id, ticks, seconds)


@rq_app.task(timeout=60, checkpointed=True)
def rq_long(job_id: str, steps: int, step_seconds: float) -> int:
    return long_body(job_id, steps, step_seconds)
