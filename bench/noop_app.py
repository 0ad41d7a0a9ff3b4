"""The workerkit app of the benchmarks: one no-op task (a Redis INCR, see bench/_counter.py).

``workerkit run sql --app bench.noop_app:app`` runs it under the supervisor (its database from
``WORKERKIT_DATABASE_URL``); :func:`make_app` builds the same app on a given URL for the
in-process worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench._counter import hit
from workerkit.app import App

if TYPE_CHECKING:
    from workerkit.settings import Settings

TASK = "noop"
QUEUE = "default"


def noop(total: int) -> None:
    hit(total)


def register(target: App) -> App:
    target.task(name=TASK, queue=QUEUE, timeout=60)(noop)
    return target


def make_app(database_url: str, settings: Settings) -> App:
    return register(App(database_url, settings=settings))


app = register(App())
