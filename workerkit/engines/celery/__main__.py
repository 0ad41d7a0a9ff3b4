"""``python -m workerkit.engines.celery``: the Celery worker the supervisor starts."""

from __future__ import annotations

from workerkit.engines.celery.worker import main

__all__ = ("main",)

if __name__ == "__main__":
    main()
