"""A Celery project laid out as Celery's docs teach it, for the migration tests.

``celery.py`` builds the app from ``celeryconfig`` (``config_from_object``), registers
``reports`` with ``include=[...]`` and finds ``billing.tasks`` with ``autodiscover_tasks``; the
tasks are ``@shared_task``. Start it as ``celery -A tests.apps.migrating_proj.celery:app
worker`` or ``workerkit run celery --app tests.apps.migrating_proj.celery:app``.
"""

from __future__ import annotations

from tests.apps.migrating_proj.celery import app as celery_app

__all__ = ("celery_app",)
