"""The project's Celery settings, read from the environment as a deployment would.

``PROJ_EXPLICIT_DEFAULTS=1`` sets, explicitly, the values that equal Celery's own defaults
(``task_acks_late = False``, ``worker_prefetch_multiplier = 4``): they are the app's, and must be
kept and reported, not taken for unset.
"""

from __future__ import annotations

import os

broker_url = os.environ.get("E2E_REDIS_URL", "redis://127.0.0.1:6379/1")
result_backend = broker_url
broker_connection_retry_on_startup = True
task_serializer = "json"
result_expires = 600

if os.environ.get("PROJ_EXPLICIT_DEFAULTS"):
    task_acks_late = False
    worker_prefetch_multiplier = 4
