"""The project's Celery app."""

from __future__ import annotations

from celery import Celery

__all__ = ("app",)

app = Celery("proj")
app.config_from_object("proj.celeryconfig")
app.autodiscover_tasks(["proj"])
