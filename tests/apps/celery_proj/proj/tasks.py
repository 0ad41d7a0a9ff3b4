"""The project's tasks, declared with ``@shared_task`` as reusable apps do."""

from __future__ import annotations

from celery import shared_task

__all__ = ("add",)


@shared_task
def add(x: int, y: int) -> int:
    return x + y
