"""A Celery project as Celery's "First steps" guide lays it out, for the compat suite.

``celery.py`` builds the app from ``celeryconfig`` and finds ``tasks`` with
``autodiscover_tasks()``; ``celery -A proj worker`` (or ``workerkit run celery -A proj``) is run
in the directory holding ``proj``. Every task run is recorded in Redis by the task itself.
"""

from __future__ import annotations

from .celery import app as celery_app

__all__ = ("celery_app",)
