"""Apps for the ``workerkit check`` golden test (tests/unit/test_check_golden.py).

``docs_app`` has the tasks of the "With tasks" sample in docs/concepts/timing-budget.md; the
Celery apps override workerkit's Celery defaults unsafely, so the C rules fire.
"""

from __future__ import annotations

from celery import Celery

import workerkit

__all__ = ("celery_no_hard_limit", "celery_overrides", "docs_app")

docs_app = workerkit.App()


@docs_app.task(name="send_welcome_email", timeout=20)
def send_welcome_email(user_id: int) -> None:
    """Fits in the drain window."""


@docs_app.task(name="backfill_orders", timeout=3600, checkpointed=True)
def backfill_orders(total: int) -> None:
    """Long, but resumes from its checkpoint."""


@docs_app.task(name="rebuild_search_index")
def rebuild_search_index() -> None:
    """Long (job_timeout), neither idempotent nor checkpointed: T1 warns."""


_BROKER = "redis://127.0.0.1:1/0"  # never connected to: check only reads the configuration

celery_overrides = Celery("golden_overrides", broker=_BROKER)
celery_overrides.conf.update(
    task_acks_late=False,
    task_reject_on_worker_lost=False,
    worker_prefetch_multiplier=4,
    task_soft_time_limit=400,
    task_time_limit=350,
    broker_transport_options={"visibility_timeout": 100},
)


@celery_overrides.task(name="golden.add", shared=False)
def add(x: int, y: int) -> int:
    return x + y


@celery_overrides.task(
    name="golden.slow", shared=False, time_limit=7200, workerkit_checkpointed=True
)
def slow() -> None:
    """A task with its own hard limit."""


celery_no_hard_limit = Celery("golden_no_hard_limit", broker=_BROKER)
celery_no_hard_limit.conf.update(
    task_soft_time_limit=400,
    worker_prefetch_multiplier=0,
    task_acks_late=True,
)
