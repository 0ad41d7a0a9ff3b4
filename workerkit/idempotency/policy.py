"""The idempotency decorator and the per-task policy: key, fingerprint, claim, run, complete.

:class:`Idempotency` holds one task's key, store, Ip and R and runs a call once per key;
:func:`idempotent` wraps a function in one. The policy for each record found is in
docs/howto/idempotent-tasks.md. The last outcome of each running job is kept here too, for its
engine: a job whose run was a replay finished as a skipped duplicate.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import string
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, cast

from workerkit import events as events_module
from workerkit.errors import (
    ConfigurationError,
    IdempotencyClaimLost,
    IdempotencyError,
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
)
from workerkit.idempotency.contract import (
    Claim,
    ClaimOutcome,
    IdempotencyOutcome,
    IdempotencyStore,
)
from workerkit.idempotency.shared import default_store
from workerkit.job import current_job_or_none

if TYPE_CHECKING:
    from workerkit.job import JobContext
    from workerkit.settings import Settings

__all__ = (
    "Idempotency",
    "KeySpec",
    "fingerprint",
    "idempotency_of",
    "idempotent",
    "in_progress_expiry_for",
    "outcome_of",
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_EVENT_OUTCOME: Final[Mapping[ClaimOutcome, IdempotencyOutcome]] = {
    "claimed": "claimed",
    "taken_over": "taken_over",
    "replay": "replayed",
    "mismatch": "mismatched",
    "in_progress": "deferred",
}

#: A key: a ``str.format`` template over the task's parameter names (``"charge:{order_id}"``), or
#: a callable that gets every argument by name (``lambda order_id, **_: f"charge:{order_id}"``).
KeySpec = str | Callable[..., str]


# --- fingerprints and keys -----------------------------------------------------------------


def fingerprint(task: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """The sha256 (hex) of the canonical JSON of ``(task, args, kwargs)``.

    Canonical: keys sorted, no whitespace, non-ASCII kept as UTF-8, NaN refused, tuples as
    lists. The decorator passes every named parameter in ``kwargs`` (so ``charge(7)`` and
    ``charge(order_id=7)`` agree) and only a ``*args`` parameter's values in ``args``.
    Raises :class:`~workerkit.errors.IdempotencyError` when the arguments are not JSON.
    """
    try:
        text = json.dumps(
            {"task": task, "args": list(args), "kwargs": dict(kwargs)},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise IdempotencyError(
            f"task {task!r}: the arguments of an idempotent task must be JSON (str, int, float, "
            f"bool, None, list, dict) to be fingerprinted: {exc}; leave other parameters out "
            f"with idempotent(..., exclude=('name',))"
        ) from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _template_fields(template: str) -> list[str]:
    """The root names a ``str.format`` template uses (``{order.id}`` -> ``order``)."""
    roots = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is None:
            continue
        root = field_name.split(".", 1)[0].split("[", 1)[0]
        roots.append(root)
    return roots


# --- choosing Ip ---------------------------------------------------------------------------


def in_progress_expiry_for(settings: Settings, timeout: float | None = None) -> float:
    """Ip for a task: the setting when set, else the task's J (``timeout`` or ``job_timeout``)
    plus 30 s, so a claim always outlives the run that holds it (timing rule I1)."""
    from workerkit.timing import IN_PROGRESS_EXPIRY_PAD

    if settings.idempotency_in_progress_expiry is not None:
        return settings.idempotency_in_progress_expiry
    return (timeout if timeout is not None else settings.job_timeout) + IN_PROGRESS_EXPIRY_PAD


# --- the policy and the decorator ----------------------------------------------------------


# The last idempotency outcome of each running job, for its engine: a job whose run was a replay
# finished as a skipped duplicate, not as a success. Weak keys: a finished context goes away.
_job_outcomes: weakref.WeakKeyDictionary[JobContext, IdempotencyOutcome] = (
    weakref.WeakKeyDictionary()
)
_job_outcomes_lock = threading.Lock()


def outcome_of(context: JobContext) -> IdempotencyOutcome | None:
    """The last idempotency outcome of the job behind ``context``, or None (no key was used).

    An engine reports a job that returned after ``replayed`` as ``skipped_duplicate``.
    """
    with _job_outcomes_lock:
        return _job_outcomes.get(context)


def _resolve(value: Any) -> Any:
    return value() if callable(value) else value


class Idempotency:
    """How one task's runs are made idempotent: its key, store, Ip and R.

    Built by :func:`idempotent`; ``app.task(idempotency_key=...)`` builds one too. ``store`` and
    ``settings`` may be callables, resolved at the first run (a task is defined at import time,
    before the worker has its settings).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        key: KeySpec,
        *,
        name: str | None = None,
        store: IdempotencyStore | Callable[[], IdempotencyStore] | None = None,
        settings: Settings | Callable[[], Settings] | None = None,
        in_progress_expiry: float | None = None,
        retention: float | None = None,
        timeout: float | None = None,
        exclude: Iterable[str] = (),
    ) -> None:
        self.name = name or f"{fn.__module__}.{fn.__qualname__}"
        if inspect.iscoroutinefunction(fn):
            raise ConfigurationError(
                f"task {self.name!r}: @idempotent does not support async functions"
            )
        for what, value in (
            ("in_progress_expiry", in_progress_expiry),
            ("retention", retention),
            ("timeout", timeout),
        ):
            if value is not None and not value > 0:
                raise ConfigurationError(
                    f"task {self.name!r}: idempotent {what} must be above 0 seconds, got {value!r}"
                )
        self.fn = fn
        self.key = key
        self.exclude = frozenset(exclude)
        self.in_progress_expiry = in_progress_expiry
        self.retention = retention
        self.timeout = timeout
        self._store = store
        self._settings = settings
        try:
            self._signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):  # some builtins and C callables have none
            self._signature = None
        self._check_key()

    def __repr__(self) -> str:
        return f"<Idempotency {self.name} key={self.key!r}>"

    def _check_key(self) -> None:
        if callable(self.key):
            return
        if not isinstance(self.key, str) or not self.key:
            raise ConfigurationError(
                f"task {self.name!r}: an idempotency key is a non-empty str.format template "
                f"(such as 'charge:{{order_id}}') or a callable, got {self.key!r}"
            )
        try:
            roots = _template_fields(self.key)
        except ValueError as exc:
            raise ConfigurationError(
                f"task {self.name!r}: idempotency key template {self.key!r} is malformed: {exc}"
            ) from None
        if not roots:
            raise ConfigurationError(
                f"task {self.name!r}: idempotency key template {self.key!r} names no parameter, "
                f"so every call would share one key; use the parameters that identify the work, "
                f"such as 'charge:{{order_id}}'"
            )
        sig = self._signature
        params = sig.parameters if sig is not None else {}
        takes_any = sig is None or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )
        for root in roots:
            if root == "" or root.isdigit():
                raise ConfigurationError(
                    f"task {self.name!r}: idempotency key template {self.key!r} uses a "
                    f"positional field; name the parameter, as in 'charge:{{order_id}}'"
                )
            if not takes_any and root not in params:
                raise ConfigurationError(
                    f"task {self.name!r}: idempotency key template {self.key!r} uses {root!r}, "
                    f"which is not a parameter of the task (it has: {', '.join(params) or 'none'})"
                )

    # --- resolving per run ------------------------------------------------------------

    def bind_settings(self, settings: Settings) -> None:
        """Take the defaults from ``settings`` unless the task was given settings of its own.

        An engine's worker calls this with the settings it runs with, so that a task defined
        at import time (before any settings exist) uses the worker's store, not the defaults of
        whatever environment imported it.
        """
        if self._settings is None:
            self._settings = settings

    @property
    def settings(self) -> Settings:
        """The settings the defaults come from (resolved once, at the first run)."""
        settings = _resolve(self._settings)
        if settings is None:
            from workerkit.settings import load_settings

            settings = load_settings()
            self._settings = settings
        return cast("Settings", settings)

    @property
    def store(self) -> IdempotencyStore:
        """The store: the one given, else :func:`default_store` for the settings."""
        store = _resolve(self._store)
        if store is None:
            return default_store(self.settings)
        return cast(IdempotencyStore, store)

    def effective_in_progress_expiry(self) -> float:
        """Ip: given, else the setting, else this task's J + 30."""
        if self.in_progress_expiry is not None:
            return self.in_progress_expiry
        return in_progress_expiry_for(self.settings, self.timeout)

    def effective_retention(self) -> float:
        """R: given, else the ``idempotency_retention`` setting."""
        if self.retention is not None:
            return self.retention
        return self.settings.idempotency_retention

    def arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Every argument by parameter name, defaults applied, ``**kwargs`` flattened."""
        sig = self._signature
        if sig is None:
            return dict(kwargs)
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        named: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        return named

    def key_for(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The idempotency key of one call."""
        named = self.arguments(args, kwargs)
        if callable(self.key):
            try:
                key = self.key(**named)
            except TypeError as exc:
                raise ConfigurationError(
                    f"task {self.name!r}: the idempotency key callable is called with every "
                    f"argument by name ({', '.join(named) or 'none'}) and failed: {exc}; accept "
                    f"the ones you use and **_ for the rest"
                ) from exc
        else:
            try:
                key = self.key.format_map(named)
            except (KeyError, AttributeError, IndexError) as exc:
                raise IdempotencyError(
                    f"task {self.name!r}: idempotency key template {self.key!r} cannot be "
                    f"filled from the arguments ({', '.join(named) or 'none'}): {exc!r}"
                ) from exc
        if not isinstance(key, str) or not key:
            raise IdempotencyError(
                f"task {self.name!r}: the idempotency key must be a non-empty string, got {key!r}"
            )
        return key

    def fingerprint_for(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The fingerprint of one call: explicitly passed arguments by name, ``exclude`` left out.

        Defaults are *not* applied: adding a parameter with a default in a deploy does not make
        the runs of calls that do not pass it mismatch their records.
        """
        sig = self._signature
        if sig is None:
            return fingerprint(self.name, args, kwargs)
        bound = sig.bind(*args, **kwargs)
        positional: list[Any] = []
        named: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if name in self.exclude:
                continue
            kind = sig.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                positional.extend(value)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                named.update({k: v for k, v in value.items() if k not in self.exclude})
            else:
                named[name] = value
        return fingerprint(self.name, positional, named)

    # --- one run ------------------------------------------------------------------------

    def run(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """Run the function once per key: claim, run and complete; or replay, refuse or defer."""
        key = self.key_for(args, kwargs)
        ip = self.effective_in_progress_expiry()
        store = self.store
        claim = store.claim(key, self.fingerprint_for(args, kwargs), in_progress_expiry=ip)
        self._report(key, claim)
        if claim.outcome == "replay":
            return json.loads(claim.result_json) if claim.result_json is not None else None
        if claim.outcome == "mismatch":
            raise IdempotencyKeyMismatch(
                f"idempotency key {key!r} was already used with other arguments (or by another "
                f"task) than this run of {self.name!r}: a key must name one piece of work; "
                f"this job is failed, not retried",
                key=key,
            )
        if claim.outcome == "in_progress":
            wait = claim.retry_after
            raise IdempotencyInProgress(
                f"idempotency key {key!r} is held by another live run of {self.name!r}"
                + (f" (its claim expires in {wait:.1f}s)" if wait is not None else "")
                + "; retry later",
                key=key,
                retry_after=wait,
            )
        token = claim.token
        if token is None:  # pragma: no cover - a store bug
            raise IdempotencyError(f"the idempotency store claimed {key!r} without a token")
        try:
            result = self.fn(*args, **kwargs)
        except BaseException:
            # A failure, a timeout, a release, an interrupt: the work may be redone, so let the
            # next attempt claim at once instead of deferring until Ip.
            self._forget(store, key, token)
            raise
        try:
            encoded = json.dumps(result, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            self._forget(store, key, token)
            raise IdempotencyError(
                f"task {self.name!r}: the result of an idempotent task must be JSON (it is "
                f"replayed to duplicates): {exc}"
            ) from exc
        if not store.complete(key, token, encoded, retention=self.effective_retention()):
            log.warning(
                "idempotent run finished after its claim was taken over; result not recorded",
                extra={"event": "idempotency_claim_lost", "task": self.name, "key": key},
            )
            raise IdempotencyClaimLost(
                f"idempotency key {key!r}: this run of {self.name!r} outlived its claim "
                f"(in-progress expiry Ip = {self.effective_in_progress_expiry():g}s) and another "
                f"run took it over; this run's result was not recorded (raise "
                f"idempotency_in_progress_expiry above the task's timeout)",
                key=key,
            )
        return result

    def _forget(self, store: IdempotencyStore, key: str, token: str) -> None:
        try:
            store.forget(key, token)
        except Exception as exc:
            # The claim then blocks retries until it expires (Ip), and is taken over after.
            log.warning(
                "could not drop the claim of a failed idempotent run",
                extra={
                    "event": "idempotency_forget_failed",
                    "task": self.name,
                    "key": key,
                    "error": str(exc),
                },
            )

    def _report(self, key: str, claim: Claim) -> None:
        outcome = _EVENT_OUTCOME[claim.outcome]
        context = current_job_or_none()
        task = context.task if context is not None else self.name
        queue = context.queue if context is not None else ""
        if context is not None:
            with _job_outcomes_lock:
                _job_outcomes[context] = outcome
        events_module.client().send(events_module.Idempotency(task, queue, outcome))
        level = {
            "claimed": logging.DEBUG,
            "replayed": logging.INFO,
            "deferred": logging.INFO,
            "taken_over": logging.WARNING,
            "mismatched": logging.WARNING,
        }[outcome]
        log.log(
            level,
            "idempotency key %s",
            outcome.replace("_", " "),
            extra={"event": f"idempotency_{outcome}", "task": task, "key": key},
        )


def idempotent(
    key: KeySpec,
    *,
    store: IdempotencyStore | Callable[[], IdempotencyStore] | None = None,
    name: str | None = None,
    in_progress_expiry: float | None = None,
    retention: float | None = None,
    timeout: float | None = None,
    exclude: Iterable[str] = (),
    settings: Settings | Callable[[], Settings] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Make a task idempotent by key, on any engine (DESIGN section 6).

    ``key``: a ``str.format`` template over the parameter names (``"charge:{order_id}"``) or a
    callable given every argument by name (``lambda order_id, **_: f"charge:{order_id}"``).
    Keys are global to the store: put the task's purpose in them.

    ``store``: an :class:`IdempotencyStore` or a callable returning one; default
    :func:`default_store` (sql engine: ``database_url``; rq, celery: ``redis_url``).
    ``name``: the task name in the fingerprint (default ``module.qualname``).
    ``in_progress_expiry`` (Ip): default the setting, else ``timeout`` (else ``job_timeout``)
    + 30. ``retention`` (R): default the ``idempotency_retention`` setting. ``exclude``:
    parameters left out of the fingerprint (a bound Celery task's ``self``, a trace id).
    ``settings``: where those defaults come from (default :func:`~workerkit.load_settings` at
    the first run).

    A duplicate run returns the stored result, JSON-decoded (a tuple comes back as a list).
    Raises :class:`~workerkit.errors.IdempotencyKeyMismatch` (permanent) and
    :class:`~workerkit.errors.IdempotencyInProgress` (retry later; ``retry_after`` says when
    the holder's claim expires at the latest).
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        policy = Idempotency(
            fn,
            key,
            name=name,
            store=store,
            settings=settings,
            in_progress_expiry=in_progress_expiry,
            retention=retention,
            timeout=timeout,
            exclude=exclude,
        )

        @functools.wraps(fn)
        def run_once(*args: P.args, **kwargs: P.kwargs) -> R:
            return cast(R, policy.run(args, kwargs))

        run_once.__workerkit_idempotency__ = policy  # type: ignore[attr-defined]
        return run_once

    return decorate


def idempotency_of(fn: Callable[..., Any]) -> Idempotency | None:
    """The :class:`Idempotency` of a function decorated with :func:`idempotent`, else None."""
    policy = getattr(fn, "__workerkit_idempotency__", None)
    return policy if isinstance(policy, Idempotency) else None
