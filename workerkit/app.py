"""Defining and enqueuing jobs for workerkit's native queue.

::

    app = workerkit.App()                      # WORKERKIT_DATABASE_URL, else ./workerkit.sqlite3

    @app.task(queue="emails", timeout=60, max_attempts=5)
    def send_welcome(user_id: int) -> None: ...

    send_welcome.enqueue(42)                                   # returns the job id
    send_welcome.configure(delay=30, job_id="welcome-42").enqueue(42)
    send_welcome.enqueue_many([((1,), {}), ((2,), {})])     # one transaction; the ids in order

Arguments and results are JSON, never pickle: a worker must not run code a queue writer chose.
"""

from __future__ import annotations

import difflib
import json
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from workerkit.engines.base import NewJob
from workerkit.errors import ConfigurationError, PayloadError, PayloadTooLarge, UnknownTask
from workerkit.idempotency import KeySpec, idempotency_of
from workerkit.idempotency import idempotent as make_idempotent
from workerkit.job_ids import new_job_id
from workerkit.settings import Settings, load_settings

if TYPE_CHECKING:
    from datetime import timedelta

    from workerkit.engines.base import QueueBackend
    from workerkit.idempotency import IdempotencyStore
    from workerkit.job import JobContext
    from workerkit.scheduler.contract import Misfire, Schedule
    from workerkit.timing import TaskTiming

__all__ = ("App", "EnqueueOptions", "PreparedJob", "Task", "decode_payload", "encode_payload")

#: ``json.dumps(allow_nan=False, separators=(",", ":"))`` built once: ``dumps`` with options
#: builds an encoder per call, a third of a bulk enqueue's Python time per job.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))

P = ParamSpec("P")
R = TypeVar("R")


def encode_payload(
    task: str,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    cap: int,
    *,
    fired_by: tuple[str, float] | None = None,
) -> str:
    """Args and kwargs as JSON text; PayloadError when not JSON or over ``cap`` bytes.

    ``fired_by``: (schedule name, fire time) of a job the scheduler enqueues; the worker gives
    them to the job as ``current_job().schedule`` and ``.fire_time``.
    """
    body: dict[str, Any] = {"args": list(args), "kwargs": kwargs}
    if fired_by is not None:
        body["schedule"], body["fire_time"] = fired_by
    try:
        text = _ENCODER.encode(body)
    except (TypeError, ValueError) as exc:
        raise PayloadError(
            f"task {task!r}: arguments must be JSON (str, int, float, bool, None, list, dict): "
            f"{exc}"
        ) from exc
    except RecursionError:
        raise PayloadError(
            f"task {task!r}: arguments are nested too deeply to encode as JSON (more levels "
            f"than the interpreter's recursion limit, {sys.getrecursionlimit()}); flatten them "
            "or pass a reference (a row id, an object-store key)"
        ) from None
    size = len(text.encode())
    if size > cap:
        raise PayloadTooLarge(
            f"task {task!r}: payload is {size} bytes, over max_payload_bytes={cap}; pass a "
            f"reference (a row id, an object-store key) instead, or raise "
            f"WORKERKIT_MAX_PAYLOAD_BYTES"
        )
    return text


def decode_payload(
    payload: str, into: JobContext | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """Args and kwargs back from JSON text; PayloadError with the reason when malformed.

    ``into``: the job's context, given the schedule and fire time of a scheduled job.
    """
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise PayloadError(f"payload is not valid JSON: {exc}") from exc
    except RecursionError:
        raise PayloadError(
            "payload is nested too deeply to decode (more levels than the interpreter's "
            f"recursion limit, {sys.getrecursionlimit()})"
        ) from None
    if not isinstance(data, dict):
        raise PayloadError("payload must be a JSON object with 'args' and 'kwargs'")
    args = data.get("args", [])
    kwargs = data.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise PayloadError("payload 'args' must be a list and 'kwargs' an object")
    if into is not None and "schedule" in data:
        schedule, fire_time = data["schedule"], data.get("fire_time")
        if not isinstance(schedule, str) or not isinstance(fire_time, int | float):
            raise PayloadError("payload 'schedule' must be a string and 'fire_time' a number")
        into.schedule, into.fire_time = schedule, float(fire_time)
    return args, kwargs


@dataclass(frozen=True)
class EnqueueOptions:
    """How one enqueue differs from the task's defaults."""

    queue: str | None = None
    delay: float | None = None
    run_at: float | None = None  # epoch seconds
    job_id: str | None = None


@dataclass(frozen=True)
class PreparedJob:
    """One job of a bulk enqueue (:meth:`App.enqueue_many`): a task by name, its arguments,
    its options. Made by ``task.prepare(...)`` or ``task.configure(job_id=...).prepare(...)``,
    as RQ's ``Queue.prepare_data``; or directly, for a task this process cannot import."""

    task: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: EnqueueOptions = EnqueueOptions()


#: What ``Task.enqueue_many`` takes per job: a prepared job, or an ``(args, kwargs)`` pair.
BulkItem = PreparedJob | tuple[Sequence[Any], Mapping[str, Any]]


class Task(Generic[P, R]):
    """A function registered with an :class:`App`. Calling it runs it here, now."""

    def __init__(
        self,
        app: App,
        fn: Callable[P, R],
        *,
        name: str,
        queue: str,
        timeout: float | None,
        max_attempts: int,
        retry_backoff: float,
        retry_backoff_max: float,
        checkpointed: bool,
        idempotent: bool,
    ) -> None:
        if max_attempts < 1:
            raise ConfigurationError(f"task {name!r}: max_attempts must be at least 1")
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"task {name!r}: timeout must be above 0 seconds")
        self.app = app
        self.fn = fn
        self.name = name
        self.queue = queue
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.checkpointed = checkpointed
        self.idempotent = idempotent
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Put a job for this task in its queue; return its id."""
        return self.app.enqueue_task(self, args, kwargs, EnqueueOptions())

    def prepare(self, *args: P.args, **kwargs: P.kwargs) -> PreparedJob:
        """This call as one job of :meth:`enqueue_many` (arguments type-checked like a call)."""
        return PreparedJob(self.name, args, kwargs)

    def enqueue_many(
        self,
        jobs: Iterable[BulkItem],
        *,
        queue: str | None = None,
        delay: float | None = None,
        run_at: float | None = None,
    ) -> list[str]:
        """Enqueue many jobs of this task at once; return their ids, in order.

        Each job is an ``(args, kwargs)`` pair, ``((1,), {"force": True})``, or
        ``task.prepare(1, force=True)`` (``task.configure(job_id=..., delay=...).prepare(...)``
        for a job with its own options). ``queue``, ``delay`` and ``run_at`` apply to every job
        that does not set its own. See :meth:`App.enqueue_many` for the guarantees.
        """
        return self.app.enqueue_many(
            (self._bulk_job(index, item) for index, item in enumerate(jobs)),
            queue=queue,
            delay=delay,
            run_at=run_at,
        )

    def _bulk_job(self, index: int, item: BulkItem) -> PreparedJob:
        if isinstance(item, PreparedJob):
            if item.task != self.name:
                raise ConfigurationError(
                    f"{self.name}.enqueue_many: job {index} is for task {item.task!r}; give "
                    "jobs of several tasks to app.enqueue_many(...) instead"
                )
            return item
        if (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], list | tuple)
            and isinstance(item[1], Mapping)
        ):
            return PreparedJob(self.name, item[0], item[1])
        raise ConfigurationError(
            f"{self.name}.enqueue_many: job {index} is {item!r}; give each job as an "
            "(args, kwargs) pair such as ((1, 2), {}) or ((), {'user_id': 1}), or as "
            f"{self.name.rsplit('.', 1)[-1]}.prepare(...)"
        )

    def configure(
        self,
        *,
        queue: str | None = None,
        delay: float | None = None,
        run_at: float | None = None,
        job_id: str | None = None,
    ) -> _ConfiguredTask[P, R]:
        """Enqueue options for one call: ``task.configure(delay=30).enqueue(...)``.

        ``job_id`` makes enqueuing idempotent: a second enqueue with the same id does nothing
        and returns the same id.
        """
        if delay is not None and run_at is not None:
            raise ConfigurationError("give delay or run_at, not both")
        return _ConfiguredTask(self, EnqueueOptions(queue, delay, run_at, job_id))

    def retry_delay(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1``: exponential, capped, with jitter.

        "Equal jitter": half the exponential step is kept, half is random, so retries of many
        jobs that failed together (a database blip) spread out instead of failing together again.
        """
        step = min(self.retry_backoff_max, self.retry_backoff * 2.0 ** max(0, attempt - 1))
        return step / 2 + random.uniform(0, step / 2)


class _ConfiguredTask(Generic[P, R]):
    def __init__(self, task: Task[P, R], options: EnqueueOptions) -> None:
        self.task = task
        self.options = options

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> str:
        return self.task.app.enqueue_task(self.task, args, kwargs, self.options)

    def prepare(self, *args: P.args, **kwargs: P.kwargs) -> PreparedJob:
        """This call, with these options, as one job of ``enqueue_many``."""
        return PreparedJob(self.task.name, args, kwargs, self.options)


class App:
    """A set of tasks and the queue they go through.

    ``database_url`` defaults to the ``database_url`` setting (``WORKERKIT_DATABASE_URL``, the
    config file, else a SQLite file in the working directory). Pass ``backend`` to use another
    queue, such as :class:`workerkit.testing.InMemoryQueue` in tests.

    ``idempotency_store`` keeps the records of tasks with an ``idempotency_key``; by default the
    SQL store on the app's database (the queue's own), or, with an
    :class:`~workerkit.testing.InMemoryQueue` backend, an
    :class:`~workerkit.testing.InMemoryIdempotencyStore` on the queue's clock.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        backend: QueueBackend | None = None,
        settings: Settings | None = None,
        idempotency_store: IdempotencyStore | None = None,
    ) -> None:
        self._settings = settings
        self._database_url = database_url
        self._backend = backend
        self._idempotency_store = idempotency_store
        self.tasks: dict[str, Task[Any, Any]] = {}
        #: The periodic jobs (:meth:`periodic`, :meth:`schedule`) that ``workerkit scheduler
        #: sql`` fires, by name.
        self.schedules: dict[str, Schedule] = {}

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    def configure_settings(self, settings: Settings) -> None:
        """Use these settings (the worker passes the ones it was started with)."""
        self._settings = settings

    @property
    def database_url(self) -> str:
        return self._database_url or self.settings.database_url

    @property
    def backend(self) -> QueueBackend:
        if self._backend is None:
            from workerkit.engines.sql.queue import SqlQueue

            self._backend = SqlQueue(self.database_url, settings=self.settings)
        return self._backend

    @property
    def idempotency_store(self) -> IdempotencyStore:
        """Where the records of this app's idempotent tasks live (see the class docstring)."""
        if self._idempotency_store is None:
            from workerkit.engines.sql.memory import InMemoryQueue
            from workerkit.idempotency.memory import InMemoryIdempotencyStore

            if isinstance(self._backend, InMemoryQueue):
                self._idempotency_store = InMemoryIdempotencyStore(clock=self._backend.clock)
            else:
                from workerkit.idempotency import shared_store

                return shared_store("sql", self.database_url)
        return self._idempotency_store

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        timeout: float | None = None,
        max_attempts: int = 3,
        retry_backoff: float = 2.0,
        retry_backoff_max: float = 600.0,
        checkpointed: bool = False,
        idempotent: bool = False,
        idempotency_key: KeySpec | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        timeout: float | None = None,
        max_attempts: int = 3,
        retry_backoff: float = 2.0,
        retry_backoff_max: float = 600.0,
        checkpointed: bool = False,
        idempotent: bool = False,
        idempotency_key: KeySpec | None = None,
    ) -> Any:
        """Register a task. ``timeout`` defaults to the ``job_timeout`` setting.

        ``checkpointed`` and ``idempotent`` tell ``workerkit check`` that a re-run of this task
        resumes or is harmless, so a timeout longer than the drain window is not a warning.

        ``idempotency_key`` (a template such as ``"charge:{order_id}"`` or a callable given every
        argument by name) makes the task idempotent by key, as :func:`workerkit.idempotent` does:
        a second run with the key replays the first one's result. The records live in
        :attr:`idempotency_store`; Ip is this task's timeout + 30 s unless
        ``idempotency_in_progress_expiry`` is set. It implies ``idempotent=True``; so does a
        function already decorated with :func:`workerkit.idempotent`.
        """

        def register(func: Callable[..., Any]) -> Task[Any, Any]:
            task_name = name or f"{func.__module__}.{func.__qualname__}"
            if task_name in self.tasks:
                raise ConfigurationError(f"task {task_name!r} is registered twice")
            safe_to_rerun = idempotent or idempotency_of(func) is not None
            if idempotency_key is not None:
                if idempotency_of(func) is not None:
                    raise ConfigurationError(
                        f"task {task_name!r}: give idempotency_key= or @workerkit.idempotent, "
                        "not both"
                    )
                func = make_idempotent(
                    idempotency_key,
                    name=task_name,
                    store=lambda: self.idempotency_store,
                    settings=lambda: self.settings,
                    timeout=timeout,
                )(func)
                safe_to_rerun = True
            task: Task[Any, Any] = Task(
                self,
                func,
                name=task_name,
                queue=queue,
                timeout=timeout,
                max_attempts=max_attempts,
                retry_backoff=retry_backoff,
                retry_backoff_max=retry_backoff_max,
                checkpointed=checkpointed,
                idempotent=safe_to_rerun,
            )
            self.tasks[task_name] = task
            return task

        return register(fn) if fn is not None else register

    def periodic(
        self,
        name: str,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        anchor: float | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timezone: str | None = None,
        queue: str | None = None,
        misfire: Misfire = "latest",
        max_catch_up: int = 100,
        misfire_grace: float | None = None,
    ) -> Callable[[Task[P, R]], Task[P, R]]:
        """Fire the decorated task on a schedule (``workerkit scheduler sql`` does)::

            @app.periodic("nightly-report", cron="0 3 * * *", timezone="Europe/Berlin")
            @app.task
            def report() -> None: ...

        The arguments are :meth:`schedule`'s; the task is returned unchanged.
        """

        def declare(task: Task[P, R]) -> Task[P, R]:
            if not isinstance(task, Task):
                raise ConfigurationError(
                    f"schedule {name!r}: @app.periodic(...) goes above @app.task (it schedules "
                    f"a registered task), got {type(task).__name__}"
                )
            self.schedule(
                name,
                task,
                cron=cron,
                every=every,
                anchor=anchor,
                args=args,
                kwargs=kwargs,
                timezone=timezone,
                queue=queue,
                misfire=misfire,
                max_catch_up=max_catch_up,
                misfire_grace=misfire_grace,
            )
            return task

        return declare

    def schedule(
        self,
        name: str,
        task: Task[Any, Any] | str,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        anchor: float | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timezone: str | None = None,
        queue: str | None = None,
        misfire: Misfire = "latest",
        max_catch_up: int = 100,
        misfire_grace: float | None = None,
    ) -> Schedule:
        """Declare a periodic job: ``task`` (registered here) with these arguments, on
        ``cron`` (a five-field expression, in ``timezone``, UTC by default) or ``every``
        seconds (at ``anchor + k * every``, anchor 0 = the epoch by default, so every replica
        computes the same times).

        ``misfire``: what to do with fire times missed while every scheduler was down: ``skip``
        none, ``latest`` the most recent, ``all`` each (up to ``max_catch_up``), each with its
        own fire time. Returns the :class:`~workerkit.scheduler.contract.Schedule`.
        """
        from workerkit.scheduler.declare import make_schedule

        registered = self.get_task(task) if isinstance(task, str) else task
        made = make_schedule(
            name,
            registered.name,
            cron=cron,
            every=every,
            anchor=anchor,
            args=args,
            kwargs=kwargs or {},
            timezone=timezone,
            queue=queue or registered.queue,
            options={"max_attempts": registered.max_attempts},
            misfire=misfire,
            max_catch_up=max_catch_up,
            misfire_grace=misfire_grace,
        )
        if name in self.schedules:
            raise ConfigurationError(f"schedule {name!r} is declared twice; give each its own name")
        self.schedules[name] = made
        return made

    def get_task(self, name: str) -> Task[Any, Any]:
        """The task registered as ``name``; UnknownTask naming the closest names otherwise."""
        task = self.tasks.get(name)
        if task is not None:
            return task
        close = difflib.get_close_matches(name, list(self.tasks), n=3)
        if close:
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?"
        else:
            names = sorted(self.tasks)
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            hint = f"its tasks: {', '.join(names[:10]) or 'none'}{more}"
        raise UnknownTask(f"no task {name!r} is registered in the app; {hint}")

    def enqueue_task(
        self,
        task: Task[Any, Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        options: EnqueueOptions,
    ) -> str:
        """Encode and store one job; return its id (the existing one for a duplicate id)."""
        return self.enqueue(
            task.name,
            args,
            kwargs,
            options,
            max_attempts=task.max_attempts,
            default_queue=task.queue,
        )

    def enqueue(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        options: EnqueueOptions | None = None,
        *,
        max_attempts: int | None = None,
        default_queue: str = "default",
    ) -> str:
        """Enqueue by task name (the task need not be importable here, as from the shell)."""
        job = self._new_job(
            PreparedJob(task_name, args, kwargs or {}, options or EnqueueOptions()),
            max_attempts=max_attempts,
            default_queue=default_queue,
            now=time.time(),
        )
        self.backend.enqueue(job)
        return job.job_id

    def enqueue_many(
        self,
        jobs: Iterable[PreparedJob],
        *,
        queue: str | None = None,
        delay: float | None = None,
        run_at: float | None = None,
    ) -> list[str]:
        """Enqueue many jobs, of one task or several, at once; return their ids, in order.

        ``jobs``: :class:`PreparedJob` s, from ``task.prepare(...)``. ``queue``, ``delay`` and
        ``run_at`` apply to every job that does not set its own.

        All or nothing: every payload is encoded first, and one that is not JSON or is over
        ``max_payload_bytes`` refuses the whole batch (:class:`~workerkit.errors.PayloadError`
        naming the job's index) before anything is written; then the jobs are written in one
        transaction (on the SQL queue: one INSERT per chunk of thousands, one NOTIFY), so a
        database error leaves none of them enqueued. A job whose id exists already (or came
        earlier in ``jobs``) is skipped, as :meth:`Task.enqueue` skips it, and its id is
        returned all the same. Jobs of one batch share their enqueue time.
        """
        if delay is not None and run_at is not None:
            raise ConfigurationError("give delay or run_at, not both")
        defaults = EnqueueOptions(queue=queue, delay=delay, run_at=run_at)
        now = time.time()
        batch: list[NewJob] = []
        for index, prepared in enumerate(jobs):
            if not isinstance(prepared, PreparedJob):
                raise ConfigurationError(
                    f"enqueue_many: job {index} is {type(prepared).__name__}, not a PreparedJob; "
                    "make each with task.prepare(...), or call task.enqueue_many(...)"
                )
            try:
                batch.append(self._new_job(prepared, defaults=defaults, now=now))
            except PayloadError as exc:
                raise type(exc)(
                    f"enqueue_many: job {index} refused, nothing was enqueued: {exc}"
                ) from exc
        if batch:
            self.backend.enqueue_many(batch)
        return [job.job_id for job in batch]

    def _new_job(
        self,
        prepared: PreparedJob,
        *,
        defaults: EnqueueOptions | None = None,
        max_attempts: int | None = None,
        default_queue: str = "default",
        now: float,
    ) -> NewJob:
        """The job to store: the payload encoded (PayloadError), the options resolved."""
        options = prepared.options
        task = self.tasks.get(prepared.task)
        if task is not None:
            default_queue = task.queue
            max_attempts = max_attempts or task.max_attempts
        kwargs = prepared.kwargs
        payload = encode_payload(
            prepared.task,
            prepared.args,
            kwargs if type(kwargs) is dict else dict(kwargs),
            self.settings.max_payload_bytes,
        )
        queue, delay, run_at = options.queue, options.delay, options.run_at
        if defaults is not None and delay is None and run_at is None:
            delay, run_at = defaults.delay, defaults.run_at
        if delay is not None:
            run_at = now + delay
        return NewJob(
            job_id=options.job_id or new_job_id(),
            task=prepared.task,
            queue=queue or (defaults and defaults.queue) or default_queue,
            payload=payload,
            max_attempts=max_attempts or 3,
            run_at=run_at,
        )

    def task_timings(self) -> list[TaskTiming]:
        """Each task's timeout and re-run safety, for the timing budget."""
        from workerkit.timing import TaskTiming

        return [TaskTiming.of(task) for task in self.tasks.values()]
