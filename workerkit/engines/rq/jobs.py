"""The job side of the RQ engine: the allowlisted job class, workerkit's job meta, the serializer.

RQ imports whatever dotted path a job names; :class:`WorkerkitJob` resolves the function and its
callbacks through the worker's :class:`~workerkit.engines.rq.tasks.RqApp` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from rq.exceptions import DeserializationError
from rq.job import Job
from rq.serializers import DefaultSerializer, JSONSerializer, resolve_serializer

from workerkit.engines.rq.tasks import RqApp, TaskNotAllowed
from workerkit.errors import ConfigurationError
from workerkit.idempotency import Idempotency

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = (
    "META_KEY",
    "WorkerkitJob",
    "job_class_of",
    "resolve_rq_serializer",
    "safe_func_name",
    "wk_meta",
)

log = logging.getLogger("workerkit.engines.rq")

#: The job meta key of workerkit's own state: ``{"attempts", "max_attempts", "checkpoint"}``.
META_KEY: Final = "workerkit"


def resolve_rq_serializer(serializer: Any) -> Any:
    """JSON unless pickle (or a custom serializer) is asked for by name or object, with a warning.

    RQ's own default is pickle, which runs code chosen by anyone who can write to Redis.
    """
    if serializer is None or serializer in ("json", JSONSerializer):
        return JSONSerializer
    resolved = resolve_serializer(serializer)
    if resolved is JSONSerializer:
        return JSONSerializer
    what = "pickle" if resolved is DefaultSerializer else f"the custom serializer {serializer!r}"
    log.warning(
        "jobs are deserialized with %s: anyone who can write to Redis can run code in this "
        "worker; use the JSON serializer unless every Redis writer is trusted",
        what,
        extra={"event": "unsafe_serializer", "serializer": str(serializer)},
    )
    return resolved


class WorkerkitJob(Job):
    """An RQ job whose function and callbacks come only from the worker's :class:`RqApp`.

    RQ resolves ``job.func`` (and the callbacks) with ``import_attribute`` on whatever dotted
    path is stored in Redis; here the path is checked against the allowlist first. The worker
    uses a subclass bound to its app (:meth:`bound_to`).
    """

    workerkit_app: RqApp | None = None
    #: The worker's settings: the defaults of ``@workerkit.idempotent`` functions it runs.
    workerkit_settings: Settings | None = None

    @classmethod
    def bound_to(
        cls, app: RqApp, base: type[Job] = Job, settings: Settings | None = None
    ) -> type[WorkerkitJob]:
        """A job class that resolves functions through ``app`` (``base``: a custom job class)."""
        bases: tuple[type, ...] = (cls,) if base in (Job, cls) else (cls, base)
        attributes = {"workerkit_app": app, "workerkit_settings": settings}
        bound = type("WorkerkitJob", bases, attributes)
        return cast("type[WorkerkitJob]", bound)

    def _resolve(self, name: str | None, what: str) -> Callable[..., Any]:
        app = self.workerkit_app
        if app is None:
            raise TaskNotAllowed(f"job {self.id}: no RqApp configured, so no {what} may run")
        func = app.resolve(name)
        settings = self.workerkit_settings
        if settings is not None:
            _bind_idempotency(func, settings)
        return func

    @property
    def func(self) -> Any:
        if self.instance is not None:
            raise TaskNotAllowed(
                f"job {self.id}: jobs that call a method of a stored instance are not supported; "
                "enqueue a module-level function"
            )
        return self._resolve(self.func_name, "function")

    @property
    def success_callback(self) -> Any:
        name = self._success_callback_name
        return self._resolve(name, "callback") if name else None

    @property
    def failure_callback(self) -> Any:
        name = self._failure_callback_name
        return self._resolve(name, "callback") if name else None

    @property
    def stopped_callback(self) -> Any:
        name = self._stopped_callback_name
        return self._resolve(name, "callback") if name else None


def _bind_idempotency(func: Callable[..., Any], settings: Settings) -> None:
    """Give an ``@idempotent`` function that was given no settings the worker's own.

    Its default store is chosen by ``settings.engine``: left to itself it would load the
    settings from the environment, where ``rq worker --worker-class ...`` may have no
    ``WORKERKIT_ENGINE`` (the sql engine's default, a local SQLite file: no deduplication across
    pods) nor the Redis URL the worker was given.
    """
    policy = getattr(func, "__workerkit_idempotency__", None)
    if isinstance(policy, Idempotency):
        policy.bind_settings(settings)


def wk_meta(job: Job) -> dict[str, Any]:
    """workerkit's part of the job's meta (created empty when missing)."""
    meta = job.meta.get(META_KEY)
    if not isinstance(meta, dict):
        meta = {}
        job.meta[META_KEY] = meta
    return meta


def safe_func_name(job: Job) -> str | None:
    """The job's function name, or None when its data cannot be deserialized."""
    try:
        return job.func_name
    except DeserializationError:
        return None


def job_class_of(job_class: Any) -> type[Job]:
    """The custom job class a worker was given (a class or its dotted path), or RQ's Job."""
    if job_class is None:
        return Job
    if isinstance(job_class, str):
        from rq.utils import import_job_class

        job_class = import_job_class(job_class)
    if not (isinstance(job_class, type) and issubclass(job_class, Job)):
        raise ConfigurationError(f"job_class {job_class!r} is not an rq.job.Job subclass")
    return job_class
