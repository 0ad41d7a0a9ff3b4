"""``workerkit drill``: test a rollout under load with canary jobs, the way fortio tests a web one.

The drill enqueues canaries (:mod:`workerkit.drill.canary`) at a rate for a duration, waits for
the stragglers and reports from the canaries' own records in the store: sent, completed exactly
once, twice, lost, released, resumed, and the enqueue -> start latency over time. See
docs/reference/drill.md. The names below are imported on first use: every worker imports the
canary (:mod:`.canary`), and needs none of the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.lazy import lazy_attribute, lazy_dir

if TYPE_CHECKING:
    from workerkit.drill.canary import CANARY_TASK, KINDS
    from workerkit.drill.records import CanaryRun, RecordStore
    from workerkit.drill.report import DrillReport, Sent, build_report
    from workerkit.drill.run import DEFAULT_MIX, DrillProgress, DrillSpec, run_drill

__all__ = (
    "CANARY_TASK",
    "DEFAULT_MIX",
    "KINDS",
    "CanaryRun",
    "DrillProgress",
    "DrillReport",
    "DrillSpec",
    "RecordStore",
    "Sent",
    "build_report",
    "run_drill",
)

#: public name -> the module that defines it (imported on first access).
_HOMES: Final = {
    "CANARY_TASK": "canary",
    "KINDS": "canary",
    "CanaryRun": "records",
    "RecordStore": "records",
    "DrillReport": "report",
    "Sent": "report",
    "build_report": "report",
    "DEFAULT_MIX": "run",
    "DrillProgress": "run",
    "DrillSpec": "run",
    "run_drill": "run",
}


# Hidden from type checkers: they see the imports above, and flag a misspelled name.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        return lazy_attribute(__name__, _HOMES, globals(), name)


def __dir__() -> list[str]:
    return lazy_dir(globals(), __all__)
