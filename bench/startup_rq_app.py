"""The RQ app of bench/startup_memory.py: ``bench.startup_rq_app:app``, one no-op task."""

from __future__ import annotations

from workerkit.engines.rq import RqApp

__all__ = ("app", "noop")

app = RqApp(modules=["bench.startup_rq_app"])


@app.task(timeout=60)
def noop() -> None:
    """Does nothing (no job runs during the start-up benchmark)."""
