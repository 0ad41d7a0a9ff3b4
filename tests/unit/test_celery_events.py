"""The Celery engine's batched per-task events: what one write to the supervisor carries."""

from __future__ import annotations

import json
from typing import Any

from workerkit.engines.celery import _TaskEvents


def started(job_id: str) -> tuple[str, float, dict[str, Any]]:
    return ("job_started", 1.0, {"job_id": job_id, "task": "t", "queue": "q", "attempt": 1})


def finished(job_id: str, outcome: str = "succeeded") -> tuple[str, float, dict[str, Any]]:
    fields = {"job_id": job_id, "task": "t", "queue": "q", "outcome": outcome, "duration": 0.5}
    return ("job_finished", 2.0, fields)


def lines(batch: list[tuple[str, float, dict[str, Any]]]) -> list[dict[str, Any]]:
    data = _TaskEvents()._encode(batch)
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def test_jobs_that_started_and_succeeded_in_one_batch_are_one_jobs_finished_line() -> None:
    out = lines([started("a"), finished("a"), started("b"), finished("b")])
    assert [m["type"] for m in out] == ["jobs_finished"]
    assert out[0]["jobs"] == [["a", "t", "q", "succeeded", 0.5], ["b", "t", "q", "succeeded", 0.5]]


def test_a_start_is_kept_when_its_job_is_still_running_or_did_not_succeed() -> None:
    out = lines([started("a"), finished("a", "released"), started("b")])
    assert [m["type"] for m in out] == ["job_started", "jobs_finished", "job_started"]
    assert [out[0]["job_id"], out[2]["job_id"]] == ["a", "b"]


def test_only_consecutive_finishes_merge_so_the_order_of_a_job_is_kept() -> None:
    # Released, then redelivered and started again within one batch: the finish of the first
    # run must reach the supervisor before the start of the second.
    out = lines([started("a"), finished("a", "released"), started("a"), finished("x")])
    assert [m["type"] for m in out] == [
        "job_started",
        "jobs_finished",
        "job_started",
        "jobs_finished",
    ]
    assert out[1]["jobs"] == [["a", "t", "q", "released", 0.5]]
