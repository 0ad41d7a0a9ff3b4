"""The project's Celery app (the broker comes from WORKERKIT_REDIS_URL under workerkit)."""

from __future__ import annotations

from celery import Celery

__all__ = ("app",)

app = Celery("proj", include=["proj.tasks"])
app.conf.update(result_expires=3600)
