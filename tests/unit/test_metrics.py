"""The supervisor's metric families, moved by events from job-running processes."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, generate_latest

from workerkit.events import (
    BadMessage,
    CheckpointSaved,
    Heartbeat,
    JobStarted,
    QueueStats,
    StoreHealth,
    decode_message,
)
from workerkit.supervisor.metrics import SHUTDOWN_OUTCOMES, STATES, SupervisorMetrics


def sample(metrics: SupervisorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"engine": "sql", **labels})


def started(job_id: str, task: str = "t", queue: str = "q", **extra: Any) -> JobStarted:
    return JobStarted(job_id, task, queue, **extra)


def finished(job_id: str, outcome: str, task: str = "t", queue: str = "q", **extra: Any) -> Any:
    # Through the decoder: an outcome a process sends that is not documented reads as unknown.
    message = {"type": "job_finished", "job_id": job_id, "task": task, "queue": queue}
    return decode_message({**message, "outcome": outcome, **extra})


def wire(metrics: SupervisorMetrics, message: dict[str, Any]) -> None:
    """Apply one message as the supervisor does: decoded first."""
    event = decode_message(message)
    assert not isinstance(event, BadMessage), event
    metrics.apply(event)  # type: ignore[arg-type]


def test_families_live_in_their_own_registry_not_the_global_one() -> None:
    metrics = SupervisorMetrics("sql")
    text = generate_latest(metrics.registry).decode()
    assert "workerkit_jobs_total" in text
    assert "workerkit_jobs_total" not in generate_latest(REGISTRY).decode()
    # Two supervisors in one process do not collide.
    SupervisorMetrics("sql")


def test_every_family_has_the_prefix_and_no_job_id_label() -> None:
    metrics = SupervisorMetrics("sql")
    metrics.apply(started("job-123", queued_for=1.0))
    metrics.apply(finished("job-123", "succeeded", duration=2.0))
    for family in metrics.registry.collect():
        assert family.name.startswith("workerkit_"), family.name
        for s in family.samples:
            assert "job_id" not in s.labels
            assert "job-123" not in s.labels.values()


def test_job_started_and_finished_move_in_progress_counts_and_histograms() -> None:
    metrics = SupervisorMetrics("sql")
    metrics.apply(started("a", queued_for=1.5))
    metrics.apply(started("b"))
    assert sample(metrics, "workerkit_jobs_in_progress", queue="q", task="t") == 2
    assert sample(metrics, "workerkit_queue_wait_seconds_count", queue="q", task="t") == 1
    assert sample(metrics, "workerkit_queue_wait_seconds_sum", queue="q", task="t") == 1.5
    metrics.apply(finished("a", "succeeded", duration=3.0))
    metrics.apply(finished("b", "released", duration=1.0))
    assert sample(metrics, "workerkit_jobs_in_progress", queue="q", task="t") == 0
    assert sample(metrics, "workerkit_jobs_total", queue="q", task="t", outcome="succeeded") == 1
    assert sample(metrics, "workerkit_jobs_total", queue="q", task="t", outcome="released") == 1
    assert sample(metrics, "workerkit_job_duration_seconds_count", queue="q", task="t") == 2
    assert sample(metrics, "workerkit_job_duration_seconds_sum", queue="q", task="t") == 4.0


def test_a_finish_without_a_start_does_not_drive_in_progress_negative() -> None:
    metrics = SupervisorMetrics("sql")
    metrics.apply(finished("ghost", "failed"))
    assert sample(metrics, "workerkit_jobs_in_progress", queue="q", task="t") is None
    assert sample(metrics, "workerkit_jobs_total", queue="q", task="t", outcome="failed") == 1


def test_a_repeated_start_counts_once_in_progress() -> None:
    metrics = SupervisorMetrics("sql")
    metrics.apply(started("a"))
    metrics.apply(started("a"))
    assert sample(metrics, "workerkit_jobs_in_progress", queue="q", task="t") == 1


def test_unknown_outcomes_are_bounded_to_unknown() -> None:
    metrics = SupervisorMetrics("sql")
    metrics.apply(finished("a", "something-random-123"))
    assert sample(metrics, "workerkit_jobs_total", queue="q", task="t", outcome="unknown") == 1


def test_checkpoints_heartbeat_store_and_queue_stats() -> None:
    metrics = SupervisorMetrics("sql")
    metrics.apply(started("a", task="backfill", queue="batch"))
    metrics.apply(CheckpointSaved("a"))
    metrics.apply(CheckpointSaved("a", task="backfill", queue="batch"))
    assert sample(metrics, "workerkit_checkpoints_saved_total", queue="batch", task="backfill") == 2
    metrics.apply(Heartbeat(ts=1700000000.5))
    assert sample(metrics, "workerkit_worker_last_heartbeat_timestamp_seconds") == 1700000000.5
    metrics.apply(Heartbeat(), wall_time=42.0)
    assert sample(metrics, "workerkit_worker_last_heartbeat_timestamp_seconds") == 42.0
    metrics.apply(StoreHealth(ok=False, reason="down"))
    assert sample(metrics, "workerkit_store_up") == 0
    metrics.apply(StoreHealth(ok=True, reason="ok"))
    assert sample(metrics, "workerkit_store_up") == 1
    metrics.apply(QueueStats(depth={"batch": 7}, oldest_ready_age={"batch": 12.5}))
    assert sample(metrics, "workerkit_queue_depth", queue="batch") == 7
    assert sample(metrics, "workerkit_queue_oldest_job_age_seconds", queue="batch") == 12.5


def test_worker_state_is_one_hot() -> None:
    metrics = SupervisorMetrics("sql")
    for current in STATES:
        metrics.set_state(current)
        values = {s: sample(metrics, "workerkit_worker_state", state=s) for s in STATES}
        assert values == {s: 1.0 if s == current else 0.0 for s in STATES}


def test_shutdowns_by_outcome_and_drain_duration() -> None:
    metrics = SupervisorMetrics("sql")
    for outcome in SHUTDOWN_OUTCOMES:  # every outcome is exported from the start, at zero
        assert sample(metrics, "workerkit_shutdowns_total", outcome=outcome) == 0
    metrics.shutdown("released", 4.2)
    metrics.shutdown("crashed", None)
    assert sample(metrics, "workerkit_shutdowns_total", outcome="released") == 1
    assert sample(metrics, "workerkit_shutdowns_total", outcome="crashed") == 1
    assert sample(metrics, "workerkit_drain_duration_seconds_count") == 1
    assert sample(metrics, "workerkit_drain_duration_seconds_sum") == 4.2


def test_abandon_settles_jobs_of_a_dead_worker() -> None:
    metrics = SupervisorMetrics("sql")
    metrics.apply(started("a"))
    metrics.abandon(["a", "unknown"], "released")
    assert sample(metrics, "workerkit_jobs_in_progress", queue="q", task="t") == 0
    assert sample(metrics, "workerkit_jobs_total", queue="q", task="t", outcome="released") == 1


def samples(metrics: SupervisorMetrics) -> dict[tuple[str, tuple[Any, ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if not s.name.startswith("workerkit_bad_messages")
    }


def test_malformed_events_do_not_raise() -> None:
    metrics = SupervisorMetrics("sql")
    metrics.apply(started("a", queued_for=1.0))
    before = samples(metrics)
    malformed: list[dict[str, Any]] = [
        {},
        {"type": "job_started"},
        {"type": "job_started", "job_id": "b", "task": 7},
        {"type": "job_finished", "duration": "slow"},
        {"type": "job_finished", "job_id": "a", "duration": "slow"},
        {"type": "checkpoint_saved", "task": "t"},
        {"type": "queue_stats", "depth": [1, 2]},
        {"type": "queue_stats", "depth": {"q": "many"}},
        {"type": "heartbeat", "ts": True},
        {"type": "store_health", "ok": "yes"},
        {"type": "idempotency", "task": "t", "queue": "q", "outcome": "made-up"},
        {"type": "jobs_finished", "jobs": "not a list"},
        {"type": "nonsense"},
        {"cmd": "nonsense"},
    ]
    for message in malformed:
        event = decode_message(message)
        assert isinstance(event, BadMessage), message
        metrics.apply(event)
    # No family moved, not even the job in progress; each message was counted as bad.
    assert samples(metrics) == before
    assert sample(metrics, "workerkit_bad_messages_total") == len(malformed)
    # What the registry holds: the one job started before, still running, and nothing else.
    assert sample(metrics, "workerkit_jobs_in_progress", queue="q", task="t") == 1
    assert sample(metrics, "workerkit_queue_wait_seconds_count", queue="q", task="t") == 1
    assert sample(metrics, "workerkit_queue_wait_seconds_sum", queue="q", task="t") == 1.0
    series = {name for (name, _labels), value in samples(metrics).items() if value}
    assert series - {"workerkit_worker_state"} == {
        "workerkit_jobs_in_progress",
        "workerkit_queue_wait_seconds_bucket",
        "workerkit_queue_wait_seconds_count",
        "workerkit_queue_wait_seconds_created",
        "workerkit_queue_wait_seconds_sum",
        "workerkit_shutdowns_created",
    }


def test_every_family_is_in_the_metrics_reference() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "reference" / "metrics.md").read_text()
    metrics = SupervisorMetrics("sql", scheduler=True)
    for family in metrics.registry.collect():
        exported = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{exported}`" in doc, exported


def test_idempotency_outcomes_are_counted_with_bounded_labels() -> None:
    metrics = SupervisorMetrics("sql")
    for outcome in ("claimed", "replayed", "replayed", "deferred", "made-up"):
        message = {"type": "idempotency", "task": "charge", "queue": "q", "outcome": outcome}
        event = decode_message(message)
        metrics.apply(event)  # type: ignore[arg-type]
        if outcome == "made-up":  # not one of the decisions: a bad message, not a label
            assert isinstance(event, BadMessage)
    assert (
        sample(metrics, "workerkit_idempotency_total", queue="q", task="charge", outcome="replayed")
        == 2
    )
    assert (
        sample(metrics, "workerkit_idempotency_total", queue="q", task="charge", outcome="claimed")
        == 1
    )
    assert (
        sample(metrics, "workerkit_idempotency_total", queue="q", task="charge", outcome="made-up")
        is None
    )


def test_refused_payloads_are_counted_by_queue_and_reason_never_by_job() -> None:
    metrics = SupervisorMetrics("rq")
    for job_id, reason in [("a", "pickled"), ("b", "pickled"), ("c", "refused_global")]:
        wire(metrics, {"type": "payload_refused", "job_id": job_id, "queue": "q", "reason": reason})
    bad = decode_message({"type": "payload_refused", "job_id": "d", "queue": "q", "reason": "x"})
    assert isinstance(bad, BadMessage)  # a reason that is not documented is no label

    def refused(reason: str) -> float | None:
        return metrics.registry.get_sample_value(
            "workerkit_payloads_refused_total", {"engine": "rq", "queue": "q", "reason": reason}
        )

    assert (refused("pickled"), refused("refused_global"), refused("undecodable")) == (
        2,
        1,
        None,
    )


def test_a_jobs_finished_batch_counts_like_its_job_finished_events() -> None:
    one_by_one, batched = SupervisorMetrics("sql"), SupervisorMetrics("sql")
    for metrics in (one_by_one, batched):
        metrics.apply(started("a"))
    one_by_one.apply(finished("a", "succeeded", duration=2.0))
    one_by_one.apply(finished("b", "failed", duration=1.0))
    wire(
        batched,
        {
            "type": "jobs_finished",
            "jobs": [
                ["a", "t", "q", "succeeded", 2.0],
                ["b", "t", "q", "failed", 1.0],
                ["too", "short"],  # malformed items are skipped
                [7, "t", "q", "succeeded", 1.0],
            ],
        },
    )
    for name, labels in (
        ("workerkit_jobs_total", {"outcome": "succeeded"}),
        ("workerkit_jobs_total", {"outcome": "failed"}),
        ("workerkit_jobs_in_progress", {}),
        ("workerkit_job_duration_seconds_count", {}),
        ("workerkit_job_duration_seconds_sum", {}),
    ):
        expected = sample(one_by_one, name, queue="q", task="t", **labels)
        assert expected is not None
        assert sample(batched, name, queue="q", task="t", **labels) == expected, name


def test_a_worker_has_no_scheduler_families() -> None:
    metrics = SupervisorMetrics("sql")
    wire(metrics, {"type": "scheduler_leadership", "leading": True, "epoch": 1})
    assert b"workerkit_scheduler" not in generate_latest(metrics.registry)


def test_scheduler_leadership_fires_and_delays() -> None:
    metrics = SupervisorMetrics("sql", scheduler=True)
    assert sample(metrics, "workerkit_scheduler_leader") == 0.0
    wire(metrics, {"type": "scheduler_leadership", "leading": False})  # starts as a standby
    assert sample(metrics, "workerkit_scheduler_leader_changes_total") == 0.0
    wire(metrics, {"type": "scheduler_leadership", "leading": True, "epoch": 3})
    assert sample(metrics, "workerkit_scheduler_leader") == 1.0
    for outcome, delay in (("fired", 0.004), ("fired", 0.03), ("already_fired", 0.5)):
        message = {"type": "schedule_fired", "schedule": "s", "outcome": outcome}
        wire(metrics, {**message, "reason": "on_time", "delay": delay})
    wire(metrics, {"type": "schedule_fired", "schedule": "s", "outcome": "bogus"})
    assert sample(metrics, "workerkit_scheduler_fires_total", schedule="s", outcome="fired") == 2
    assert (
        sample(metrics, "workerkit_scheduler_fires_total", schedule="s", outcome="already_fired")
        == 1
    )
    assert sample(metrics, "workerkit_scheduler_fires_total", schedule="s", outcome="unknown") == 1
    # only what was enqueued is a fire delay
    assert sample(metrics, "workerkit_scheduler_fire_delay_seconds_count") == 2
    assert sample(metrics, "workerkit_scheduler_fire_delay_seconds_bucket", le="0.005") == 1
    wire(metrics, {"type": "scheduler_leadership", "leading": False, "epoch": None})
    assert sample(metrics, "workerkit_scheduler_leader") == 0.0
    assert sample(metrics, "workerkit_scheduler_leader_changes_total") == 2.0


def test_a_scheduler_that_exits_leads_no_more() -> None:
    metrics = SupervisorMetrics("sql", scheduler=True)
    wire(metrics, {"type": "scheduler_leadership", "leading": True, "epoch": 2})
    metrics.shutdown("crashed", None)  # its process died without saying it stepped down
    assert sample(metrics, "workerkit_scheduler_leader") == 0.0
