"""The RQ task allowlist and its timing facts: :class:`RqApp`.

RQ imports whatever dotted path a job names (``rq.utils.import_attribute``), so anyone who can
write to Redis can make a bare RQ worker call ``os.system``. A workerkit RQ worker resolves a job's
function (and its success, failure and stopped callbacks) only through an :class:`RqApp`: a
function registered with :meth:`RqApp.task`, or a function *defined* in one of the app's allowed
modules. Anything else fails the job with the reason, before any import happens.
"""

from __future__ import annotations

import importlib
import keyword
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from workerkit.errors import ConfigurationError, UnknownTask
from workerkit.scheduler.contract import Misfire, Schedule

if TYPE_CHECKING:
    from workerkit.scheduler.contract import Trigger
    from workerkit.settings import Settings
    from workerkit.timing import TaskTiming

__all__ = (
    "DEFAULT_MAX_ATTEMPTS",
    "RQ_SCHEDULE_OPTIONS",
    "RqApp",
    "RqTaskInfo",
    "TaskNotAllowed",
    "load_app",
)

F = TypeVar("F", bound=Callable[..., Any])

#: Attempts a job gets when neither its task nor its enqueuer says otherwise: a job whose
#: worker dies this many times (an out-of-memory kill each time) ends in the failed registry.
DEFAULT_MAX_ATTEMPTS = 3

#: The enqueue options a schedule may give its RQ jobs (``Queue.enqueue``'s, same meaning).
RQ_SCHEDULE_OPTIONS = ("job_timeout", "result_ttl", "failure_ttl", "description", "at_front")


class TaskNotAllowed(UnknownTask):
    """The job names a function that this worker's RqApp does not allow."""


@dataclass(frozen=True)
class RqTaskInfo:
    """What workerkit knows about one registered RQ task."""

    name: str
    timeout: float | None
    max_attempts: int
    checkpointed: bool
    idempotent: bool


class RqApp:
    """The functions a workerkit RQ worker may run, and their timing facts.

    ::

        # myproject/rq_app.py
        from workerkit.engines.rq import RqApp

        app = RqApp(modules=["myproject.jobs"])      # every function defined there may run

        @app.task(timeout=900, checkpointed=True)      # timing facts for `workerkit check`
        def backfill(start: int) -> None: ...

    and run ``workerkit run rq --app myproject.rq_app:app``. ``app.task`` returns the function
    itself, so ``queue.enqueue(backfill, 0)`` works as with plain RQ.
    """

    def __init__(self, modules: Iterable[str] = ()) -> None:
        self.modules: tuple[str, ...] = tuple(modules)
        for module in self.modules:
            if not module or not all(part.isidentifier() for part in module.split(".")):
                raise ConfigurationError(
                    f"RqApp(modules=...): {module!r} is not a module path such as 'myproject.jobs'"
                )
        self.tasks: dict[str, RqTaskInfo] = {}
        self._functions: dict[str, Callable[..., Any]] = {}
        # Names of allowed modules' functions already resolved (each job resolves its function
        # and callbacks): the checks and the import are per name, not per job. Refusals are not
        # cached, so the cache holds only names the allowlist admits.
        self._resolved: dict[str, Callable[..., Any]] = {}
        #: The periodic jobs of this app, by name (``workerkit scheduler rq`` fires them).
        self.schedules: dict[str, Schedule] = {}

    def __repr__(self) -> str:
        return f"<RqApp modules={list(self.modules)} tasks={list(self.tasks)}>"

    @overload
    def task(self, fn: F, /) -> F: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        checkpointed: bool = False,
        idempotent: bool = False,
    ) -> Callable[[F], F]: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        checkpointed: bool = False,
        idempotent: bool = False,
    ) -> Any:
        """Allow ``fn`` and record its timeout and whether a re-run is safe.

        ``timeout`` is for ``workerkit check`` (and is the run limit of jobs enqueued without
        RQ's ``job_timeout``); ``max_attempts`` bounds how often a job whose worker crashed is
        run again. A function decorated with ``@workerkit.idempotent`` counts as idempotent.
        """
        if max_attempts < 1:
            raise ConfigurationError(
                f"RqApp.task: max_attempts must be at least 1, got {max_attempts}"
            )
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"RqApp.task: timeout must be above 0 seconds, got {timeout}")

        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            from workerkit.idempotency import idempotency_of

            name = f"{func.__module__}.{func.__qualname__}"
            if name in self.tasks:
                raise ConfigurationError(f"RqApp: task {name!r} is registered twice")
            self.tasks[name] = RqTaskInfo(
                name=name,
                timeout=timeout,
                max_attempts=max_attempts,
                checkpointed=checkpointed,
                idempotent=idempotent or idempotency_of(func) is not None,
            )
            self._functions[name] = func
            self._resolved.pop(name, None)
            return func

        return register(fn) if fn is not None else register

    def resolve(self, name: str | None) -> Callable[..., Any]:
        """The function a job names, if this app allows it; :class:`TaskNotAllowed` otherwise.

        ``name`` is a registered task, or ``module.function`` or ``module.Class.method`` (a
        static or class method) with the function, or the class, *defined* in an allowed module.
        No module outside the allowed ones is ever imported: the name is checked first.
        """
        if not name:
            raise TaskNotAllowed("the job names no function")
        registered = self._functions.get(name) or self._resolved.get(name)
        if registered is not None:
            return registered
        parts = name.split(".")
        if not all(part.isidentifier() and not keyword.iskeyword(part) for part in parts):
            raise TaskNotAllowed(f"task {name!r} is not allowed: it is not a dotted Python name")
        # The longest allowed module the name starts with, then shorter ones that exist: for
        # `myproject.jobs.Reporter.build`, `myproject.jobs.Reporter` is no module, the class is.
        for cut in range(len(parts) - 1, 0, -1):
            module_name = ".".join(parts[:cut])
            if not self.allows_module(module_name):
                break
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if (
                    exc.name == module_name
                    and cut > 1
                    and self.allows_module(".".join(parts[: cut - 1]))
                ):
                    continue  # no such module: the rest of the name is inside its parent
                raise TaskNotAllowed(
                    f"task {name!r}: cannot import {module_name!r}: {exc}"
                ) from exc
            except ImportError as exc:
                raise TaskNotAllowed(
                    f"task {name!r}: cannot import {module_name!r}: {exc}"
                ) from exc
            func = self.defined_in(module, module_name, parts[cut:], name)
            self._resolved[name] = func
            return func
        raise TaskNotAllowed(
            f"task {name!r} is not allowed: it is neither registered with RqApp.task nor "
            f"defined in an allowed module ({', '.join(self.modules) or 'none'}); "
            "register it, or add its module to RqApp(modules=...)"
        )

    def resolve_global(self, module_name: str, qualname: str) -> Any:
        """The global a pickled payload names, if this app allows it (``safe-pickle``).

        As :meth:`resolve`, with the module given: a registered task, or a public class or
        function defined in an allowed module (``qualname`` may be dotted: ``Reporter.Kind``).
        """
        name = f"{module_name}.{qualname}"
        found = self._functions.get(name) or self._resolved.get(name)
        if found is not None:
            return found
        if not self.allows_module(module_name):
            raise TaskNotAllowed(
                f"{name!r} is not allowed: {module_name!r} is not one of the allowed modules "
                f"({', '.join(self.modules) or 'none'})"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise TaskNotAllowed(f"{name!r}: cannot import {module_name!r}: {exc}") from exc
        found = self.defined_in(module, module_name, qualname.split("."), name)
        self._resolved[name] = found
        return found

    def allows_module(self, module_name: str) -> bool:
        """Whether ``module_name`` is one of the allowed modules or inside one."""
        return any(
            module_name == module or module_name.startswith(module + ".") for module in self.modules
        )

    @staticmethod
    def defined_in(
        module: Any, module_name: str, attributes: Sequence[str], name: str
    ) -> Callable[..., Any]:
        """``module.A.b``: a public callable defined in the module (a class's, when dotted).

        Defined there, not merely imported there: `myproject.jobs.system` must not reach
        os.system because myproject/jobs.py happens to `from os import system`; each class on
        the way must be defined there too, and so must the method at the end.
        """
        for attribute in attributes:
            if (
                not attribute.isidentifier()
                or keyword.iskeyword(attribute)
                or attribute.startswith("_")
            ):
                raise TaskNotAllowed(
                    f"task {name!r} is not allowed: {attribute!r} is not a public name"
                )
        owner = module
        for attribute in attributes[:-1]:
            owner = getattr(owner, attribute, None)
            if not isinstance(owner, type) or owner.__module__ != module_name:
                raise TaskNotAllowed(
                    f"task {name!r} is not allowed: {module_name!r} defines no class {attribute!r}"
                )
        func = getattr(owner, attributes[-1], None)
        if not callable(func) or getattr(func, "__module__", None) != module_name:
            raise TaskNotAllowed(
                f"task {name!r} is not allowed: {module_name!r} defines no function "
                f"{'.'.join(attributes)!r} (functions it only imports must be enqueued by their "
                "own module)"
            )
        return func  # type: ignore[no-any-return]

    def periodic(
        self,
        name: str,
        *,
        cron: str | None = None,
        every: float | None = None,
        anchor: float | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timezone: str | None = None,
        queue: str = "default",
        misfire: Misfire = "latest",
        max_catch_up: int = 100,
        misfire_grace: float | None = None,
        **options: Any,
    ) -> Callable[[F], F]:
        """Run the decorated task on a schedule (``workerkit scheduler rq`` enqueues it).

        ::

            @app.periodic("nightly-report", cron="0 3 * * *", timezone="Europe/Berlin")
            @app.task(timeout=600)
            def report() -> None: ...

        Arguments as :meth:`schedule`; the function stays as it is.
        """

        def declare(func: F) -> F:
            task = f"{func.__module__}.{func.__qualname__}"
            self.schedule(
                name, task, cron=cron, every=every, anchor=anchor, args=args, kwargs=kwargs,
                timezone=timezone, queue=queue, misfire=misfire, max_catch_up=max_catch_up,
                misfire_grace=misfire_grace, **options,
            )  # fmt: skip
            return func

        return declare

    def schedule(
        self,
        name: str,
        task: str | Callable[..., Any],
        *,
        cron: str | None = None,
        every: float | None = None,
        anchor: float | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timezone: str | None = None,
        queue: str = "default",
        misfire: Misfire = "latest",
        max_catch_up: int = 100,
        misfire_grace: float | None = None,
        **options: Any,
    ) -> Schedule:
        """Enqueue ``task(*args, **kwargs)`` on ``queue`` at every fire time.

        ``cron`` (five fields, in ``timezone``, UTC by default) or ``every`` seconds (at
        ``anchor + k * every``, the epoch by default, so every replica computes the same
        times). ``misfire``: what to do with times missed while no scheduler ran (``skip``,
        ``latest``, ``all`` up to ``max_catch_up``). ``options``: RQ's enqueue options
        (:data:`RQ_SCHEDULE_OPTIONS`).
        """
        where = f"RqApp.schedule({name!r})"
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"{where}: the name must be a non-empty string")
        if name in self.schedules:
            raise ConfigurationError(f"{where}: a schedule of this name is already declared")
        if callable(task):
            task = f"{task.__module__}.{task.__qualname__}"
        unknown = sorted(set(options) - set(RQ_SCHEDULE_OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown option(s) {', '.join(unknown)}; RQ's enqueue options here "
                f"are {', '.join(RQ_SCHEDULE_OPTIONS)}"
            )
        if not queue or not isinstance(queue, str):
            raise ConfigurationError(f"{where}: queue must be a queue name such as 'default'")
        schedule = Schedule(
            name=name,
            task=task,
            trigger=_trigger(where, cron, every, timezone, anchor),
            args=tuple(args),
            kwargs=dict(kwargs or {}),
            queue=queue,
            options=dict(options),
            misfire=misfire,
            max_catch_up=max_catch_up,
            misfire_grace=misfire_grace,
        )
        from workerkit.scheduler.plan import validate_schedule

        try:
            validate_schedule(schedule)
        except ValueError as exc:
            raise ConfigurationError(f"{where}: {exc}") from exc
        self.schedules[name] = schedule
        return schedule

    def info(self, name: str | None) -> RqTaskInfo | None:
        """The registered facts of a task, or None."""
        return self.tasks.get(name or "")

    def task_timings(self) -> list[TaskTiming]:
        """Each registered task's timeout and re-run safety, for the timing budget."""
        from workerkit.timing import TaskTiming

        return [TaskTiming.of(task) for task in self.tasks.values()]


def _trigger(
    where: str, cron: str | None, every: float | None, timezone: str | None, anchor: float | None
) -> Trigger:
    """The trigger of ``cron=`` or ``every=`` (exactly one), with a clear error otherwise."""
    from workerkit.scheduler.triggers import trigger_from

    try:
        return trigger_from(cron=cron, every=every, timezone=timezone, anchor=anchor)
    except ValueError as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc


def load_app(settings: Settings) -> RqApp:
    """The :class:`RqApp` named by ``settings.app``; ConfigurationError when there is none.

    The app is the task allowlist, so the rq worker refuses to run without one.
    """
    if not settings.app:
        raise ConfigurationError(
            "workerkit's RQ worker runs only the tasks of an RqApp (RQ would otherwise import "
            "any function a Redis writer names): set --app / WORKERKIT_APP to MODULE:ATTRIBUTE "
            "of a workerkit.engines.rq.RqApp (docs/engines/rq.md)"
        )
    from workerkit.loading import import_app

    app = import_app(settings.app)
    if not isinstance(app, RqApp):
        raise ConfigurationError(
            f"--app {settings.app!r} is a {type(app).__name__}, not a workerkit.engines.rq.RqApp"
        )
    return app
