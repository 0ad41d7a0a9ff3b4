"""Tasks found by ``app.autodiscover_tasks(["tests.apps.migrating_proj.billing"])``."""

from __future__ import annotations

import time

from celery import shared_task

from tests.apps.journal import record

__all__ = ("charge", "slow_invoice")


@shared_task
def charge(invoice: str) -> str:
    record(f"charge {invoice}")
    return f"charged {invoice}"


@shared_task(time_limit=2)
def slow_invoice(invoice: str, seconds: float) -> str:
    """Its own hard limit (2 s) and no soft limit: Celery kills it at 2 s."""
    record(f"start {invoice}")
    time.sleep(seconds)
    record(f"end {invoice}")
    return invoice
