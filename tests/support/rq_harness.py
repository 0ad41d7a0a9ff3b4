"""Running ``workerkit run rq`` for real: processes, real signals, a private Redis, a journal.

Plain helpers built on :mod:`tests.support.harness` (whose ``Supervisor`` wrapper they reuse); the
test modules wrap them in fixtures. Every process started here is stopped by its own pid at the
end of the test.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from tests.support.harness import (
    WORKERKIT,
    Journaled,
    Supervisor,
    start_worker,
    stopped_after,
    wait_until,
)
from workerkit.engines.rq.jobs import read_state

__all__ = ("RqEnv", "rq_supervisor", "start_rq_supervisor")


@dataclass
class RqEnv(Journaled):
    """One test's Redis database, journal and settings (as environment variables)."""

    tmp: Path
    redis_url: str
    journal: Path
    extra: dict[str, str] = field(default_factory=dict)

    def connection(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def queue(self, name: str = "default") -> Queue:
        return Queue(name, connection=self.connection(), serializer=JSONSerializer)

    def enqueue(
        self, task: str, *args: Any, job_id: str, queue: str = "default", **options: Any
    ) -> Job:
        return self.queue(queue).enqueue(
            f"tests.apps.rq_jobs.{task}", *args, job_id=job_id, **options
        )

    def job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=self.connection(), serializer=JSONSerializer)

    def state(self, job_id: str) -> dict[str, Any]:
        """workerkit's state of the job (attempts, checkpoint): not in the user's meta."""
        return read_state(self.connection(), job_id)

    def started(self, queue: str = "default") -> list[str]:
        return StartedJobRegistry(queue, connection=self.connection()).get_job_ids(cleanup=False)

    def failed(self, queue: str = "default") -> list[str]:
        return FailedJobRegistry(queue, connection=self.connection()).get_job_ids(cleanup=False)

    def wait_prefix(self, prefix: str, timeout: float = 15.0, *, nth: int = 1) -> str:
        """The ``nth`` journal line that starts with ``prefix``, once it is there."""

        def found() -> str | None:
            matching = [line for line in self.lines() if line.startswith(prefix)]
            return matching[nth - 1] if len(matching) >= nth else None

        line: str = wait_until(
            found, timeout=timeout, what=f"journal line #{nth} starting {prefix!r}"
        )
        return line


def start_rq_supervisor(
    env: RqEnv,
    *,
    name: str = "supervisor",
    worker_class: str = "forking",
    serializer: str | None = None,
    **settings: str,
) -> Supervisor:
    argv = [*WORKERKIT, "run", "rq", "--worker-class", worker_class]
    if serializer is not None:
        argv += ["--serializer", serializer]
    return start_worker(
        argv,
        env,
        app="tests.apps.rq_jobs:app",
        name=name,
        engine={"redis_url": env.redis_url, "checkpoint_interval": "0.5"},
        settings=settings,
    )


def rq_supervisor(env: RqEnv, **kwargs: Any) -> contextlib.AbstractContextManager[Supervisor]:
    return stopped_after(start_rq_supervisor(env, **kwargs))
