"""Tasks registered through ``include=[...]`` of the app."""

from __future__ import annotations

from celery import shared_task

from tests.apps.journal import record

__all__ = ("monthly_report",)


@shared_task
def monthly_report(month: str) -> str:
    record(f"report {month}")
    return f"report {month}"
