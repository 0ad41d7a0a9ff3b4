"""Running ``workerkit run rq`` for real: processes, real signals, a private Redis, a journal.

Plain helpers built on :mod:`tests.e2e.harness` (whose ``Supervisor`` wrapper they reuse); the
test modules wrap them in fixtures. Every process started here is stopped by its own pid at the
end of the test.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from tests.e2e.harness import (
    GRACE,
    MARGIN,
    REPO,
    WORKERKIT,
    Supervisor,
    spawn_logged,
    wait_until,
)
from tests.servers import free_port

__all__ = ("RqEnv", "rq_supervisor", "start_rq_supervisor")


@dataclass
class RqEnv:
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
            f"tests.e2e.rq_jobs.{task}", *args, job_id=job_id, **options
        )

    def job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=self.connection(), serializer=JSONSerializer)

    def started(self, queue: str = "default") -> list[str]:
        return StartedJobRegistry(queue, connection=self.connection()).get_job_ids(cleanup=False)

    def failed(self, queue: str = "default") -> list[str]:
        return FailedJobRegistry(queue, connection=self.connection()).get_job_ids(cleanup=False)

    def lines(self) -> list[str]:
        try:
            return self.journal.read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait_line(self, line: str, timeout: float = 15.0) -> None:
        wait_until(lambda: line in self.lines(), timeout=timeout, what=f"journal line {line!r}")

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
    **settings: str,
) -> Supervisor:
    port = free_port()
    variables = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "E2E_JOURNAL": str(env.journal),
        "WORKERKIT_APP": "tests.e2e.rq_jobs:app",
        "WORKERKIT_REDIS_URL": env.redis_url,
        "WORKERKIT_GRACE_PERIOD": str(GRACE),
        "WORKERKIT_RELEASE_MARGIN": str(MARGIN),
        "WORKERKIT_CHECKPOINT_INTERVAL": "0.5",
        "WORKERKIT_HTTP_HOST": "127.0.0.1",
        "WORKERKIT_HTTP_PORT": str(port),
        "WORKERKIT_LOG_FORMAT": "json",
        "WORKERKIT_LOG_LEVEL": "debug",
        **env.extra,
        **{f"WORKERKIT_{key.upper()}": value for key, value in settings.items()},
    }
    argv = [*WORKERKIT, "run", "rq", "--worker-class", worker_class]
    return spawn_logged(argv, env.tmp, name, port, variables)


@contextlib.contextmanager
def rq_supervisor(env: RqEnv, **kwargs: Any) -> Iterator[Supervisor]:
    running = start_rq_supervisor(env, **kwargs)
    try:
        yield running
    finally:
        running.stop()
