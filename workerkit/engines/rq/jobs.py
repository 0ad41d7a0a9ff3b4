"""The job side of the RQ engine: the allowlisted job class and workerkit's state of a job.

RQ imports whatever dotted path a job names; :class:`WorkerkitJob` resolves the function and its
callbacks through the worker's :class:`~workerkit.engines.rq.tasks.RqApp` instead. workerkit's
own state of a job (attempts, checkpoint) is a field of RQ's job hash of its own, as JSON, so
the user's ``job.meta`` is never read or rewritten by workerkit and round-trips unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, cast

from rq.exceptions import DeserializationError
from rq.job import Job

from workerkit.engines.rq.serializers import resolve_rq_serializer
from workerkit.engines.rq.tasks import RqApp, TaskNotAllowed
from workerkit.errors import ConfigurationError
from workerkit.idempotency import Idempotency

if TYPE_CHECKING:
    import redis

    from workerkit.settings import Settings

__all__ = (
    "META_KEY",
    "WorkerkitJob",
    "encode_state",
    "job_class_of",
    "read_state",
    "resolve_rq_serializer",
    "safe_func_name",
    "wk_state",
)

log = logging.getLogger("workerkit.engines.rq")

#: The field of RQ's job hash (``rq:job:<id>``) that holds workerkit's state of the job as JSON:
#: ``{"attempts", "max_attempts", "checkpoint"}``. The Lua scripts write it by this name.
#: Workers before this field kept the state in ``job.meta["workerkit"]`` (read once, then moved).
META_KEY: Final = "workerkit"
_FIELD_BYTES: Final = META_KEY.encode()


def encode_state(state: Mapping[str, Any]) -> bytes:
    """workerkit's state of a job as stored in its field (checkpoints are JSON values)."""
    return json.dumps(state, separators=(",", ":")).encode()


def _decode_state(raw: bytes | str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        state = json.loads(raw)
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


def read_state(connection: redis.Redis[Any], job_id: str) -> dict[str, Any]:
    """workerkit's state of a job as stored (``{}`` when there is none): for tests, operators."""
    return _decode_state(connection.hget(Job.key_for(job_id), META_KEY))


class WorkerkitJob(Job):
    """An RQ job whose function and callbacks come only from the worker's :class:`RqApp`.

    RQ resolves ``job.func`` (and the callbacks) with ``import_attribute`` on whatever dotted
    path is stored in Redis; here the path is checked against the allowlist first. The worker
    uses a subclass bound to its app (:meth:`bound_to`).
    """

    workerkit_app: RqApp | None = None
    #: The worker's settings: the defaults of ``@workerkit.idempotent`` functions it runs.
    workerkit_settings: Settings | None = None
    #: workerkit's state of this job, read with the job's hash (:func:`wk_state`).
    workerkit_state: dict[str, Any] | None = None
    #: The state came from ``job.meta["workerkit"]`` (an older worker's): moved at the next start.
    workerkit_legacy: bool = False

    def restore(self, raw_data: Any) -> Any:
        """RQ's restore, plus workerkit's own field of the same hash (no extra round trip)."""
        restored = super().restore(raw_data)
        raw = raw_data.get(_FIELD_BYTES, raw_data.get(META_KEY))
        self.workerkit_state = _decode_state(raw)
        self.workerkit_legacy = False
        # A meta that is not a dict (written straight into Redis) is refused at dequeue.
        meta = self.meta if isinstance(self.meta, dict) else {}
        legacy = meta.get(META_KEY) if raw is None else None
        if isinstance(legacy, dict) and "attempts" in legacy:
            self.workerkit_state = dict(legacy)
            self.workerkit_legacy = True
        return restored

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
        instance = self.instance
        if isinstance(instance, type):
            # A class method enqueued as a function (RQ stores the class and the method's
            # name): resolved by its dotted name, as `myproject.jobs.Reporter.build` would be.
            name = f"{instance.__module__}.{instance.__qualname__}.{self.func_name}"
            return self._resolve(name, "function")
        if instance is not None:
            raise TaskNotAllowed(
                f"job {self.id}: jobs that call a method of a stored instance are not supported; "
                "enqueue a module-level function, a static method or a class method"
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


def wk_state(job: Job) -> dict[str, Any]:
    """workerkit's state of the job (created empty when there is none); never in ``job.meta``."""
    state = getattr(job, "workerkit_state", None)
    if state is None:
        state = {}
        job.workerkit_state = state  # type: ignore[attr-defined]
    return state


def safe_func_name(job: Job) -> str | None:
    """The job's function name (a class method's with its class), or None when undecodable."""
    try:
        name = job.func_name
        instance = job.instance
    except DeserializationError:
        return None
    if isinstance(instance, type) and name:
        return f"{instance.__module__}.{instance.__qualname__}.{name}"
    return name


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
