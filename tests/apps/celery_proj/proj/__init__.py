"""A Celery project laid out as Celery's "Using Celery in your Application" guide lays it out:
``proj/celery.py`` defines ``app``, the package re-exports it, and ``celery -A proj worker``
finds it. Tests copy ``tests/apps/celery_proj/`` to their working
directory and run ``workerkit run celery -A proj`` there.
"""

from __future__ import annotations

from .celery import app as celery_app

__all__ = ("celery_app",)
