"""The drill's report from records: exactly once, twice (overlapping or not), lost, releases,
redelivered after completion (information, not a failure)."""

from __future__ import annotations

import json
from typing import Any

from workerkit.drill.records import CanaryRun
from workerkit.drill.report import Sent, build_report, percentile

T0 = 1_000_000.0


def run(seq: int, start: float, end: float | None, outcome: str | None = "completed",
        **kw: Any) -> CanaryRun:  # fmt: skip
    fields: dict[str, Any] = {
        "drill_id": "d1",
        "run_id": f"{seq}-{start}",
        "seq": seq,
        "kind": "short",
        "attempt": 1,
        "hostname": "pod-a",
        "pid": 1,
        "enqueued_at": T0 + seq,
        "started_at": T0 + start,
        "ended_at": None if end is None else T0 + end,
        "outcome": outcome,
    }
    fields.update(kw)
    return CanaryRun(**fields)


def sent(*seqs: int, kind: str = "short") -> list[Sent]:
    return [Sent(seq, kind, T0 + seq) for seq in seqs]


def report(items: list[Sent], runs: list[CanaryRun], **kw: Any) -> Any:
    return build_report(
        drill_id="d1", engine="sql", started_at=T0, sent=items, runs=runs,
        settings={"rate": 1, "duration": 4, "mix": {"short": 100}, "queues": ["default"]}, **kw,
    )  # fmt: skip


def test_every_canary_completed_once_is_ok() -> None:
    r = report(sent(0, 1, 2), [run(0, 0.1, 0.2), run(1, 1.5, 1.6), run(2, 2.1, 2.2)])
    assert r.ok
    assert (r.sent, r.exactly_once, r.twice, r.lost) == (3, 3, 0, 0)
    assert [round(lat, 3) for _, lat in r.samples] == [0.1, 0.5, 0.1]
    assert "PASS: all 3 canaries completed exactly once" in r.render_text()


def test_a_canary_with_no_completed_run_is_lost() -> None:
    # seq 1 started on a pod that was killed (its record never ended): lost, and abandoned.
    r = report(sent(0, 1), [run(0, 0.1, 0.2), run(1, 1.1, None, None, hostname="pod-b")])
    assert not r.ok
    assert r.lost == 1
    assert r.lost_seqs == (1,)
    assert r.abandoned == 1
    assert "FAIL: 1 lost" in r.render_text()
    assert "lost canaries (seq): 1" in r.render_text()


def test_twice_says_whether_the_runs_overlapped() -> None:
    runs = [
        run(0, 0.1, 3.0, hostname="pod-a"),
        run(0, 2.0, 2.5, hostname="pod-b"),  # ran while pod-a still ran it
        run(1, 1.1, 1.2),
        run(1, 4.0, 4.1),  # one after the other (a redelivery after the first completed)
        run(2, 2.1, 2.2),
    ]
    r = report(sent(0, 1, 2), runs)
    assert not r.ok
    assert (r.exactly_once, r.twice, r.twice_overlapping) == (1, 2, 1)
    overlap = {dup.seq: dup.overlap for dup in r.duplicates}
    assert overlap == {0: True, 1: False}
    assert "seq 0 (short), overlapping: pod-a" in r.render_text()


def test_a_redelivery_after_completion_is_information_not_a_failure() -> None:
    # seq 0 completed on pod-a, which was killed before its ack; the engine delivered it again
    # to pod-b, whose run found it completed and skipped the body.
    runs = [
        run(0, 0.1, 0.2, hostname="pod-a"),
        run(0, 3.0, 3.0, "redelivered", hostname="pod-b", attempt=2),
        run(1, 1.1, 1.2),
    ]
    r = report(sent(0, 1), runs)
    assert r.ok
    assert (r.exactly_once, r.twice, r.lost, r.redelivered, r.abandoned) == (2, 0, 0, 1, 0)
    (again,) = r.redeliveries
    assert (again.seq, again.run.hostname) == (0, "pod-b")
    assert again.completed_by is not None
    assert again.completed_by.hostname == "pod-a"
    text = r.render_text()
    assert "redelivered            1" in text
    assert "seq 0 (short): completed on pod-a at 0.2 s, again on pod-b at 3.0 s" in text
    assert "PASS: all 2 canaries completed exactly once" in text
    data = json.loads(json.dumps(r.to_json()))
    assert data["ok"] is True
    assert data["counts"]["redelivered"] == 1
    assert data["redelivered"] == [
        {"seq": 0, "kind": "short", "hostname": "pod-b", "at": 3.0,
         "completed_on": "pod-a", "completed_at": 0.2},
    ]  # fmt: skip


def test_a_redelivery_does_not_excuse_a_second_completion() -> None:
    runs = [
        run(0, 0.1, 0.2, hostname="pod-a"),
        run(0, 0.15, 0.5, hostname="pod-b"),  # ran the body too, at the same time: a failure
        run(0, 3.0, 3.0, "redelivered", hostname="pod-c"),
    ]
    r = report(sent(0), runs)
    assert not r.ok
    assert (r.twice, r.twice_overlapping, r.redelivered) == (1, 1, 1)
    assert r.redeliveries[0].completed_by is not None
    assert r.redeliveries[0].completed_by.hostname == "pod-b"  # the last to end before it


def test_releases_resumes_and_flaky_retries_are_counted_per_run() -> None:
    runs = [
        run(0, 0.1, 1.0, "released", kind="long"),
        run(0, 1.5, 3.0, resumed=True, kind="long"),
        run(1, 1.1, 1.2, "failed", kind="flaky"),
        run(1, 1.5, 1.6, attempt=2, kind="flaky"),
    ]
    r = report([Sent(0, "long", T0), Sent(1, "flaky", T0 + 1)], runs)
    assert r.ok
    assert (r.released, r.resumed, r.retried, r.abandoned) == (1, 1, 1, 0)
    assert r.by_kind["long"] == {"sent": 1, "exactly_once": 1, "twice": 0, "lost": 0}
    # Latency is to the first start, not the resumed one.
    assert [round(lat, 3) for _, lat in r.samples] == [0.1, 0.1]


def test_records_of_other_drills_and_unsent_seqs_are_ignored() -> None:
    runs = [run(0, 0.1, 0.2), run(0, 0.3, 0.4, drill_id="other"), run(7, 0.1, 0.2)]
    r = report(sent(0), runs)
    assert r.ok
    assert r.exactly_once == 1
    assert len(r.pods) == 1
    assert r.pods[0].runs == 1


def test_nothing_sent_or_stopped_early_is_not_ok() -> None:
    assert not report([], []).ok
    r = report(sent(0), [run(0, 0.1, 0.2)], stopped_early=True)
    assert not r.ok
    assert "stopped before the end" in r.render_text()


def test_latency_windows_over_time_and_pods_from_the_records() -> None:
    items = sent(0, 1, 2, 3)
    runs = [
        run(0, 0.01, 0.02, hostname="pod-a"),
        run(1, 1.01, 1.02, hostname="pod-a"),
        run(2, 4.0, 4.1, hostname="pod-b"),  # the rollout: 2 s late
        run(3, 3.02, 3.03, hostname="pod-b"),
    ]
    r = report(items, runs, windows=4)
    assert [w.count for w in r.latency] == [1, 1, 1, 1]
    assert r.latency[2].p95 is not None
    assert abs(r.latency[2].p95 - 2.0) < 1e-6
    assert [(p.hostname, p.runs) for p in r.pods] == [("pod-a", 2), ("pod-b", 2)]
    assert r.pods[1].first_seen == T0 + 3.02
    assert r.pods[1].last_seen == T0 + 4.1
    text = r.render_text()
    assert "2.00 s" in text
    assert "pod-b" in text


def test_json_shape() -> None:
    r = report(sent(0, 1), [run(0, 0.1, 0.2), run(0, 0.15, 0.3)])
    data = json.loads(json.dumps(r.to_json()))
    assert data["version"] == 1
    assert data["ok"] is False
    assert data["engine"] == "sql"
    assert data["counts"] == {
        "sent": 2, "exactly_once": 0, "twice": 1, "twice_overlapping": 1, "lost": 1,
        "released": 0, "resumed": 0, "retried": 0, "abandoned": 0, "redelivered": 0,
    }  # fmt: skip
    assert data["redelivered"] == []
    assert data["lost"] == [1]
    assert data["twice"][0]["seq"] == 0
    assert data["twice"][0]["overlap"] is True
    assert data["twice"][0]["runs"][0]["started"] == 0.1
    assert set(data["latency"]) == {"windows", "samples"}
    assert data["pods"][0]["hostname"] == "pod-a"
    assert data["settings"]["duration"] == 4


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0
