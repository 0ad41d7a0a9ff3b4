"""The project's settings (the broker from the environment, as a deployment gives it)."""

from __future__ import annotations

import os

from kombu import Queue

broker_url = os.environ.get("COMPAT_REDIS_URL", "redis://127.0.0.1:6379/0")
result_backend = broker_url
broker_connection_retry_on_startup = True
result_expires = 600
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]

# already set before the move to workerkit
task_acks_late = True

# two queues; reports go to their own
task_queues = (Queue("celery"), Queue("reports"))
task_default_queue = "celery"
task_routes = {"proj.tasks.monthly_report": {"queue": "reports"}}
