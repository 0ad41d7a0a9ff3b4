"""workerkit's exceptions: one root, a few families, a one-line docstring each.

The docstring is the default message, so ``raise StoreUnavailable()`` still says something
useful. Code that catches workerkit's errors catches :class:`WorkerkitError` or a family,
never a bare ``Exception``.
"""

from __future__ import annotations

__all__ = (
    "AppImportError",
    "ConfigurationError",
    "DuplicateJob",
    "EngineUnavailable",
    "IdempotencyClaimLost",
    "IdempotencyError",
    "IdempotencyInProgress",
    "IdempotencyKeyMismatch",
    "JobError",
    "JobInterrupted",
    "LeaseLost",
    "NoCurrentJob",
    "PayloadError",
    "PayloadTooLarge",
    "ReleaseJob",
    "SchemaOutOfDate",
    "SettingError",
    "StoreError",
    "StoreUnavailable",
    "TimingBudgetError",
    "UnknownSetting",
    "UnknownTask",
    "WorkerkitError",
)


class WorkerkitError(Exception):
    """Something went wrong in workerkit."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.__class__.__name__).strip())


# --- configuration: refuse to start -------------------------------------------------------


class ConfigurationError(WorkerkitError):
    """The configuration is invalid; workerkit refuses to start."""


class SettingError(ConfigurationError):
    """A setting has an unknown name, a wrong type or an impossible value."""

    def __init__(self, key: str, value: object, accepted: str, source: str = "") -> None:
        where = f" (from {source})" if source else ""
        super().__init__(f"setting {key!r}{where}: got {value!r}; {accepted}")
        self.key = key
        self.value = value
        self.accepted = accepted
        self.source = source


class UnknownSetting(SettingError):
    """A config file key or WORKERKIT_* variable names no setting."""

    def __init__(self, key: str, hint: str, source: str = "") -> None:
        ConfigurationError.__init__(
            self, f"unknown setting {key!r}" + (f" (from {source})" if source else "") + f"; {hint}"
        )
        self.key = key
        self.value = None
        self.accepted = hint
        self.source = source


class TimingBudgetError(ConfigurationError):
    """The timing budget has errors: the grace period, timeouts and leases disagree."""


class AppImportError(ConfigurationError):
    """The application given with --app could not be imported."""


class EngineUnavailable(ConfigurationError):
    """The engine is unknown, or its optional dependencies are not installed."""


# --- jobs: bad input goes to a failed state with the reason --------------------------------


class JobError(WorkerkitError):
    """A job could not be enqueued or run."""


class UnknownTask(JobError):
    """No task with this name is registered."""


class PayloadError(JobError):
    """The job's payload cannot be encoded or decoded, or is too large."""


class PayloadTooLarge(PayloadError):
    """The job's payload is over the size cap."""


class DuplicateJob(JobError):
    """A job with this id already exists."""


# --- leases and fencing -------------------------------------------------------------------


class LeaseLost(WorkerkitError):
    """This attempt no longer owns its job: the lease expired and another worker took it."""


class IdempotencyError(WorkerkitError):
    """An idempotency key cannot be used as asked."""


class IdempotencyKeyMismatch(IdempotencyError):
    """The idempotency key was already used with other arguments."""

    def __init__(self, message: str | None = None, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class IdempotencyInProgress(IdempotencyError):
    """Another live attempt holds this idempotency key; retry later."""

    def __init__(
        self,
        message: str | None = None,
        *,
        key: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.key = key
        #: Seconds (by the store's clock) until the holder's claim expires and may be taken over:
        #: no retry needs to wait longer than this.
        self.retry_after = retry_after


class IdempotencyClaimLost(IdempotencyError, LeaseLost):
    """Another attempt took over this idempotency key; this attempt's result was not recorded."""

    def __init__(self, message: str | None = None, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# --- infrastructure -----------------------------------------------------------------------


class StoreError(WorkerkitError):
    """The broker or database failed."""


class StoreUnavailable(StoreError):
    """The broker or database cannot be reached."""


class SchemaOutOfDate(StoreError):
    """The database schema is not the version this workerkit needs; run `workerkit db upgrade`."""


# --- control flow -------------------------------------------------------------------------


class JobInterrupted(BaseException):
    """Raised inside a job's thread to interrupt it at the release deadline.

    It derives from BaseException on purpose (like rq's ShutDownImminentException): a task's own
    ``except Exception`` must not swallow it, or a stubborn job could never be released.
    """


class ReleaseJob(BaseException):
    """Raised by ``current_job().release()`` to hand the job back to the queue.

    A BaseException for the same reason as :class:`JobInterrupted`: a task's broad
    ``except Exception`` must not turn a deliberate release into a failure.
    """


class NoCurrentJob(WorkerkitError):
    """current_job() was called outside a running job."""
