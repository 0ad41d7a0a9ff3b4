"""The project's Celery app, as ``proj/celery.py`` in Celery's "First steps" guide."""

from __future__ import annotations

from celery import Celery

__all__ = ("app",)

app = Celery("migrating_proj", include=["tests.apps.migrating_proj.reports"])
app.config_from_object("tests.apps.migrating_proj.celeryconfig")
app.autodiscover_tasks(["tests.apps.migrating_proj.billing"])
