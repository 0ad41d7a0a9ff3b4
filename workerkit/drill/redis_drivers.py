"""The drill's side of the Redis engines: enqueue canaries on rq and celery, read their records.

rq: jobs naming the canary by import path (:data:`~workerkit.drill.canary.RQ_CANARY`), JSON
payloads (the rq engine's default serializer), RQ's own ``Retry`` for the flaky canaries; Redis
is ``redis_url``. celery: ``send_task`` through the app (``--app``, as ``celery -A`` takes it) with
workerkit's settings applied, as its worker applies them; Redis is the app's broker. Records are
read from the same Redis (:class:`~workerkit.drill.records.RedisRecords`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workerkit.drill.canary import CANARY_TASK, MAX_ATTEMPTS, RQ_CANARY, canary_kwargs
from workerkit.drill.records import RecordStore, RedisRecords
from workerkit.errors import ConfigurationError

if TYPE_CHECKING:
    from workerkit.drill.report import Sent
    from workerkit.drill.run import DrillSpec, EngineDriver
    from workerkit.settings import Settings

__all__ = ("open_redis_driver",)


def _job_timeout(spec: DrillSpec) -> int:
    """RQ's run limit for a canary: well above the longest one's work."""
    return int(max(60.0, spec.long_seconds * 3 + 30))


class _RqDriver:
    records: RecordStore
    default_queues: tuple[str, ...]

    def __init__(self, settings: Settings) -> None:
        from redis import Redis

        self.redis = Redis.from_url(settings.redis_url, socket_timeout=10)
        self.records = RedisRecords(self.redis)
        self.default_queues = settings.queue_names

    def enqueue(self, batch: Sequence[Sent], queue: str, spec: DrillSpec) -> None:
        from rq import Queue, Retry
        from rq.serializers import JSONSerializer

        target = Queue(queue, connection=self.redis, serializer=JSONSerializer)
        target.enqueue_many(
            [
                Queue.prepare_data(
                    RQ_CANARY,
                    kwargs=canary_kwargs(item, spec.drill_id, spec.long_seconds),
                    job_id=f"drill-{spec.drill_id}-{item.seq}",
                    timeout=_job_timeout(spec),
                    retry=Retry(max=MAX_ATTEMPTS - 1),
                    result_ttl=600,
                    failure_ttl=86400,
                )
                for item in batch
            ]
        )

    def close(self) -> None:
        self.redis.close()


class _CeleryDriver:
    records: RecordStore
    default_queues: tuple[str, ...]

    def __init__(self, settings: Settings) -> None:
        from workerkit.engines.celery.config import configure_app, load_celery_app

        if not settings.app:
            raise ConfigurationError(
                "workerkit drill celery: give the Celery app the workers run: --app (what "
                "`celery -A` takes) or WORKERKIT_APP"
            )
        self.app = load_celery_app(settings.app)
        configure_app(self.app, settings)
        self.records = RedisRecords.from_url(str(self.app.conf.broker_url))
        self.default_queues = (str(self.app.conf.task_default_queue or "celery"),)
        # The drill's own connection to the broker it was given, not the app's producer pool:
        # the app is the user's (a module-level object others in this process may publish
        # through), its pool is cached with the broker URL of its first use, and kombu shares
        # it between every app on that URL, so it may point elsewhere and is not ours to close.
        self.connection: Any = self.app.connection_for_write()

    def enqueue(self, batch: Sequence[Sent], queue: str, spec: DrillSpec) -> None:
        producer = self.app.amqp.Producer(self.connection, auto_declare=False)
        for item in batch:
            self.app.send_task(
                CANARY_TASK,
                kwargs=canary_kwargs(item, spec.drill_id, spec.long_seconds),
                task_id=f"drill-{spec.drill_id}-{item.seq}",
                queue=queue,
                producer=producer,
            )

    def close(self) -> None:
        self.records.close()
        self.connection.release()


def open_redis_driver(spec: DrillSpec) -> EngineDriver:
    """The rq or celery driver for ``spec``."""
    if spec.engine == "rq":
        return _RqDriver(spec.settings)
    return _CeleryDriver(spec.settings)
