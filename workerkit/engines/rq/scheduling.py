"""The RQ engine's scheduler: the schedules of an :class:`RqApp` fired into RQ queues.

A fire enqueues the job RQ's ``Queue.enqueue`` would (built by RQ's own ``Job``), written by the
Redis store's fire script together with the fire's unique record (``scheduler/redis_store.py``).
What it writes: docs/engines/rq.md ("Periodic jobs"). ``python -m
workerkit.engines.rq.scheduling`` runs it (``workerkit scheduler rq``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Final

from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import now, parse_timeout

from workerkit.engines.rq.jobs import META_KEY, encode_state
from workerkit.engines.rq.serializers import resolve_rq_serializer
from workerkit.engines.rq.tasks import RqApp, load_app
from workerkit.errors import ConfigurationError
from workerkit.scheduler.contract import Schedule, SchedulerBinding
from workerkit.scheduler.redis_store import (
    DEFAULT_RETENTION,
    RedisSchedulerStore,
    RedisWrite,
    scheduler_client,
    scheduler_prefix,
)

if TYPE_CHECKING:
    import redis

    from workerkit.scheduler.redis_store import EnqueueWrites, WriteCommand
    from workerkit.settings import Settings

__all__ = (
    "RQ_SCHEDULER_PREFIX",
    "check_schedules",
    "main",
    "open_scheduler",
    "rq_enqueue_writes",
    "workers_serializer",
)

#: The scheduler's keys (lease, epoch, records, state) in RQ's Redis, for the ``default``
#: ``scheduler_namespace``; another namespace's are ``workerkit:scheduler:rq@<namespace>:``.
RQ_SCHEDULER_PREFIX: Final = "workerkit:scheduler:rq:"


def _job_hash(
    connection: redis.Redis[Any], serializer: Any, schedule: Schedule, fire_time: float, job_id: str
) -> Job:
    options = schedule.options
    queue = schedule.queue or "default"
    job = Job.create(
        schedule.task,
        args=list(schedule.args),
        kwargs=dict(schedule.kwargs),
        connection=connection,
        id=job_id,
        origin=queue,
        status=JobStatus.QUEUED,
        timeout=parse_timeout(options.get("job_timeout")) or Queue.DEFAULT_TIMEOUT,
        result_ttl=options.get("result_ttl"),
        failure_ttl=options.get("failure_ttl"),
        description=options.get("description"),
        serializer=serializer,
    )
    job.enqueued_at = now()  # as Queue._prepare_for_queue does
    return job


def rq_enqueue_writes(
    connection: redis.Redis[Any], serializer: Any = JSONSerializer
) -> EnqueueWrites:
    """The writes of ``Queue.enqueue`` for one fire, as the store's fire script does them.

    ``serializer``: the one the workers use, resolved (:func:`workers_serializer`).
    """
    resolved = serializer

    def writes(schedule: Schedule, fire_time: float, job_id: str) -> list[RedisWrite]:
        job = _job_hash(connection, resolved, schedule, fire_time, job_id)
        mapping: dict[str, Any] = job.to_dict()
        mapping[META_KEY] = encode_state({"schedule": schedule.name, "fire_time": fire_time})
        fields: list[str | bytes | int | float] = []
        for field, value in mapping.items():
            fields += [field, value]
        queue_key = Queue.redis_queue_namespace_prefix + job.origin
        push: WriteCommand = "LPUSH" if schedule.options.get("at_front") else "RPUSH"
        return [
            RedisWrite("HSET", job.key, tuple(fields)),
            RedisWrite("SADD", Queue.redis_queues_keys, (queue_key,)),
            RedisWrite(push, queue_key, (job_id,)),
        ]

    return writes


def workers_serializer(app: RqApp) -> Any:
    """The serializer the workers use: ``$WORKERKIT_RQ_SERIALIZER``, else JSON."""
    return resolve_rq_serializer(None, app)


def check_schedules(app: RqApp, serializer: Any = JSONSerializer) -> tuple[Schedule, ...]:
    """The app's schedules, each checked: its task is one the workers may run, its arguments
    encode with the workers' serializer. ConfigurationError names the schedule and the fix."""
    resolved = serializer
    for schedule in app.schedules.values():
        where = f"schedule {schedule.name!r}"
        try:
            app.resolve(schedule.task)
        except Exception as exc:
            raise ConfigurationError(
                f"{where}: the workers would refuse its task: {exc}; register the function with "
                "@app.task or add its module to RqApp(modules=...)"
            ) from exc
        try:
            resolved.dumps((schedule.task, None, list(schedule.args), dict(schedule.kwargs)))
        except Exception as exc:
            raise ConfigurationError(
                f"{where}: its args/kwargs do not encode with the workers' serializer "
                f"({type(exc).__name__}: {exc}); give JSON values (str, int, float, bool, None, "
                "lists, dicts)"
            ) from exc
    return tuple(app.schedules.values())


def open_scheduler(settings: Settings) -> SchedulerBinding:
    """The RQ app's schedules and the Redis store of ``settings.redis_url``."""
    app = load_app(settings)
    serializer = workers_serializer(app)
    schedules = check_schedules(app, serializer)
    client = scheduler_client(settings.redis_url)
    retention = float(getattr(settings, "scheduler_retention", DEFAULT_RETENTION))
    store = RedisSchedulerStore(
        client,
        rq_enqueue_writes(client, serializer),
        prefix=scheduler_prefix(RQ_SCHEDULER_PREFIX, settings.scheduler_namespace),
        retention=retention,
        namespace=settings.scheduler_namespace,
    )
    store.own_client()
    return SchedulerBinding(store=store, schedules=schedules)


def main() -> None:
    """``python -m workerkit.engines.rq.scheduling``: the scheduler process of the RQ engine."""
    from workerkit.scheduler.process import run_scheduler_process

    sys.exit(run_scheduler_process(open_scheduler))


if __name__ == "__main__":
    main()
