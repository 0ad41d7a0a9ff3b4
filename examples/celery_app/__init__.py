"""A Celery app run under workerkit (see docs/engines/celery.md)."""
