"""The pictures of the recorded results (issue 16, item 7): throughput per variant, and the
enqueue -> start latency as cumulative distributions.

    .venv/bin/python -m bench.plots      # reads bench/results/*.json, writes bench/results/*.png

Nothing is measured here: each picture is drawn from the JSON its benchmark recorded (with the
command, machine and commit, printed under the picture), so a picture never disagrees with its
table. Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results")

#: Variant names as the results files key them -> the words under a bar or beside a curve.
LABELS = {
    "celery-solo": "Celery solo (Redis)",
    "celery-acks-late": "Celery solo, acks_late",
    "rq-simple": "RQ SimpleWorker",
    "wk-run-pg-c1": "workerkit sql, PostgreSQL, c=1",
    "wk-run-sqlite": "workerkit sql, SQLite, c=1",
    "wk-run-pg-cN": "workerkit sql, PostgreSQL, c=4",
    "wk-run-pg-c8": "workerkit sql, PostgreSQL, c=8",
    "wk-sql-pg": "workerkit sql, PostgreSQL (NOTIFY)",
    "wk-sql-sqlite": "workerkit sql, SQLite (inotify)",
    "wk-rq": "workerkit run rq",
    "bare-rq": "bare rq worker",
    "wk-celery": "workerkit run celery",
    "bare-celery": "bare celery worker",
}


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text())
    return data


def _provenance(data: dict[str, Any]) -> str:
    machine = data["machine"]
    return (
        f"{data['command']}\n{machine['date']}, commit {machine['commit']}, "
        f"{machine['nproc']} CPUs, load at start {machine['loadavg_at_start']}"
    )


def throughput(out: Path) -> Path:
    """Median jobs/s per variant, the bar from min to max of its repetitions."""
    import matplotlib.pyplot as plt

    data = _load("throughput")
    names = list(data["summary"])
    medians = [data["summary"][n]["median"] for n in names]
    lows = [m - data["summary"][n]["min"] for n, m in zip(names, medians, strict=True)]
    highs = [data["summary"][n]["max"] - m for n, m in zip(names, medians, strict=True)]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.8))
    y = range(len(names))
    ax.barh(y, medians, xerr=[lows, highs], color="#4a7ab5", capsize=4)
    ax.set_yticks(list(y), [LABELS.get(n, n) for n in names])
    ax.invert_yaxis()
    ax.set_xlabel(f"no-op jobs per second (median of {data['reps']}; bar: min-max)")
    ax.set_title("Throughput, one worker process, same run")
    fig.text(0.01, 0.01, _provenance(data), fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = out / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdf(out: Path) -> Path:
    """The share of jobs started within x ms of their enqueue, every round's samples pooled."""
    import matplotlib.pyplot as plt

    data = _load("latency")
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rounds in data["samples"].items():
        values = sorted(v for samples in rounds for v in samples)
        if not values:
            continue
        shares = [(i + 1) / len(values) for i in range(len(values))]
        p50 = data["summary"][name]["p50_median"]
        ax.step(values, shares, where="post", label=f"{LABELS.get(name, name)} (p50 {p50:g} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("enqueue -> start on an idle worker (ms, log scale)")
    ax.set_ylabel("share of jobs")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Latency, cumulative distribution")
    fig.text(0.01, 0.01, _provenance(data), fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = out / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the PNGs go")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    for path in (throughput(args.out), latency_cdf(args.out)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
