"""Enqueue the example's jobs with plain RQ, on the JSON serializer workerkit's worker uses.

python -m examples.rq_app.enqueue redis://localhost:6379/0
"""

from __future__ import annotations

import sys

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from examples.rq_app.jobs import backfill, send_welcome


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "redis://localhost:6379/0"
    queue = Queue("default", connection=Redis.from_url(url), serializer=JSONSerializer)
    for user_id in range(3):
        queue.enqueue(send_welcome, user_id)
    job = queue.enqueue(backfill, 6000)  # about five minutes
    print(f"enqueued; backfill is job {job.id}")


if __name__ == "__main__":
    main()
