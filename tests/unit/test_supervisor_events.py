"""The supervisor's reading of event batches: lifecycle and metrics see each event in order."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import anyio

from workerkit.settings import Settings
from workerkit.supervisor.runner import Supervisor, _ChannelEvents


@contextlib.contextmanager
def supervisor() -> Iterator[Supervisor]:
    # The engine is not used until the supervisor starts a worker, which this test never does.
    engine: Any = object()
    sup = Supervisor(Settings(engine="celery"), engine, handle_signals=False)
    with sup._send, sup._receive:  # run() would close its inbox
        yield sup


def started(job_id: str) -> dict[str, Any]:
    delivery = {"job_id": job_id, "delivery_tag": "tag-" + job_id, "queue": "q"}
    return {
        "type": "job_started",
        "job_id": job_id,
        "task": "t",
        "queue": "q",
        "delivery": delivery,
    }


def test_a_job_started_and_finished_in_one_batch_is_not_left_in_flight() -> None:
    batch = [
        started("a"),
        started("b"),
        {"type": "jobs_finished", "jobs": [["a", "t", "q", "released", 0.1]]},
    ]
    with supervisor() as sup:
        anyio.run(sup._take, _ChannelEvents(batch))
        assert set(sup.machine.in_flight) == {"b"}
        jobs = sup.metrics.registry.get_sample_value(
            "workerkit_jobs_total",
            {"engine": "celery", "queue": "q", "task": "t", "outcome": "released"},
        )
        assert jobs == 1
        finish_b = {"type": "job_finished", "job_id": "b", "outcome": "succeeded"}
        anyio.run(sup._take, _ChannelEvents([finish_b]))
        assert sup.machine.in_flight == {}
