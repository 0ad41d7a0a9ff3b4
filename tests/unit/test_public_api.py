"""The public face: what ``import workerkit`` offers is declared, and every module declares too."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import workerkit


def test_every_public_name_is_declared_in_all() -> None:
    for name in workerkit.__all__:  # the names imported on first use (PEP 562) too
        getattr(workerkit, name)
    public = {name for name in vars(workerkit) if not name.startswith("_")} - {"annotations"}
    modules = {name for name in public if type(getattr(workerkit, name)).__name__ == "module"}
    assert public - modules == set(workerkit.__all__) - {"__version__"}


def test_every_module_declares_a_tuple_all_that_exists() -> None:
    for info in pkgutil.walk_packages(workerkit.__path__, "workerkit."):
        if ".migrations" in info.name or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        declared = getattr(module, "__all__", None)
        assert isinstance(declared, tuple), f"{info.name} has no tuple __all__"
        for name in declared:
            assert hasattr(module, name), f"{info.name}.__all__ names missing {name!r}"


#: What users import, module by module: the names in docs/, examples/ and the engines' pages.
#: A move inside the package must keep every one of these importable from here.
PUBLIC_API: dict[str, tuple[str, ...]] = {
    "workerkit": workerkit.__all__,
    "workerkit.testing": (
        "InMemoryIdempotencyStore",
        "InMemoryQueue",
        "InMemorySchedulerStore",
        "ManualClock",
        "run_jobs",
    ),
    "workerkit.errors": (
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
    ),
    # PreparedJob: one job of a bulk enqueue (app.enqueue_many), from task.prepare(...).
    "workerkit.app": ("App", "EnqueueOptions", "PreparedJob", "Task"),
    "workerkit.job": ("JobContext", "current_job", "current_job_or_none"),
    "workerkit.iteration": ("Batch", "batches", "checkpointed"),
    "workerkit.settings": ("Settings", "load_settings"),
    "workerkit.idempotency": (
        "Claim",
        "Idempotency",
        "IdempotencyRecord",
        "IdempotencyStore",
        "KeySpec",
        "idempotent",
        "outcome_of",
    ),
    "workerkit.engines.sql": ("NOTIFY_CHANNEL", "SqlEngine", "SqlQueue"),
    "workerkit.engines.rq": (
        "DEFAULT_MAX_ATTEMPTS",
        "META_KEY",
        "RqApp",
        "RqEngine",
        "RqTaskInfo",
        "SimpleWorker",
        "TaskNotAllowed",
        "Worker",
        "WorkerkitJob",
    ),
    "workerkit.engines.celery": ("CeleryEngine", "configure_app", "load_celery_app"),
    "workerkit.store": ("check_schema", "upgrade"),
    "workerkit.timing": ("Budget", "TaskTiming", "evaluate", "resolve_budget"),
    "workerkit.exitcodes": ("CONFIG_ERROR", "OK", "describe"),
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC_API))
def test_public_names_stay_importable(module_name: str) -> None:
    module = importlib.import_module(module_name)
    missing = [name for name in PUBLIC_API[module_name] if not hasattr(module, name)]
    assert missing == []
