"""``--plot FILE.png``: the drill's latency over time, with the workers' starts and stops.

Matplotlib is an optional extra (``pip install 'workerkit[plot]'``), imported only here and
only when a plot is asked for; without it the drill refuses before it starts, naming the extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workerkit.errors import ConfigurationError

if TYPE_CHECKING:
    from workerkit.drill.report import DrillReport

__all__ = ("draw", "require_matplotlib")

_MISSING = (
    "--plot needs matplotlib, which is the optional extra 'plot': pip install 'workerkit[plot]' "
    "(or drop --plot)"
)


def require_matplotlib() -> Any:
    """The ``matplotlib`` module (Agg backend); ConfigurationError naming the extra if absent."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigurationError(_MISSING) from None
    matplotlib.use("Agg")
    return matplotlib


def draw(report: DrillReport, path: str) -> None:
    """Write the PNG: each canary's enqueue -> start latency at its enqueue time, the p95 per
    window, and a band per worker from its first to its last record."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    fig, (ax, pods) = plt.subplots(
        2, 1, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    if report.samples:
        xs = [t for t, _ in report.samples]
        ys = [lat * 1000 for _, lat in report.samples]
        ax.scatter(xs, ys, s=4, alpha=0.4, label="canary (enqueue -> first start)")
    mids = [(w.start + w.end) / 2 for w in report.latency if w.p95 is not None]
    p95 = [w.p95 * 1000 for w in report.latency if w.p95 is not None]
    if mids:
        ax.plot(mids, p95, color="tab:red", marker="o", label="p95 per window")
    for window in report.latency:
        if window.not_started:
            ax.axvspan(window.start, window.end, color="tab:red", alpha=0.12, lw=0)
    for pod in report.pods:
        ax.axvline(pod.first_seen - report.started_at, color="tab:green", ls="--", alpha=0.5)
        ax.axvline(pod.last_seen - report.started_at, color="tab:gray", ls="--", alpha=0.5)
    ax.plot([], [], color="tab:green", ls="--", label="a worker's first record")
    ax.plot([], [], color="tab:gray", ls="--", label="a worker's last record")
    if any(w.not_started for w in report.latency):
        ax.axvspan(0, 0, color="tab:red", alpha=0.12, label="canaries that never started")
    ax.set_ylabel("latency (ms)")
    verdict = "PASS" if report.ok else "FAIL"
    ax.set_title(
        f"workerkit drill {report.engine}: {verdict}, {report.exactly_once}/{report.sent} exactly "
        f"once, {report.twice} twice, {report.lost} lost"
    )
    ax.legend(loc="upper left", fontsize="small")
    for row, pod in enumerate(report.pods):
        first, last = pod.first_seen - report.started_at, pod.last_seen - report.started_at
        pods.broken_barh([(first, max(last - first, 0.01))], (row - 0.4, 0.8))
        pods.text(first, row, f" {pod.hostname}", va="center", fontsize="small")
    pods.set_yticks([])
    pods.set_ylabel("workers")
    pods.set_xlabel("seconds since the drill began (enqueue time; workers: first to last record)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
