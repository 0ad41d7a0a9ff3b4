"""The supervisor: the container's PID 1 that runs an engine's worker and stops it gracefully.

:func:`run_supervisor` is the entry point (``workerkit run ENGINE``). The pieces:
:mod:`~workerkit.supervisor.lifecycle` (the pure state machine), :mod:`~.channel` (the event
socket), :mod:`~.process` (the child and PID-1 reaping), :mod:`~.early` (the worker spawned at
its start gate), :mod:`~.http` (the probes and ``/metrics``), :mod:`~.metrics` (the families the
events move) and :mod:`~.runner` (anyio glue). The names below are imported on first use: the
CLI spawns the worker (:mod:`~.early`) before it imports the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.lazy import lazy_attribute, lazy_dir

if TYPE_CHECKING:
    from workerkit.supervisor.lifecycle import Lifecycle as Lifecycle
    from workerkit.supervisor.lifecycle import State as State
    from workerkit.supervisor.runner import Supervisor as Supervisor
    from workerkit.supervisor.runner import run_supervisor as run_supervisor
    from workerkit.supervisor.runner import supervise as supervise

__all__ = ("Lifecycle", "State", "Supervisor", "run_supervisor", "supervise")

#: public name -> the module that defines it (imported on first access).
_HOMES: Final = {
    "Lifecycle": "lifecycle",
    "State": "lifecycle",
    "Supervisor": "runner",
    "run_supervisor": "runner",
    "supervise": "runner",
}


# Hidden from type checkers: they see the imports above, and flag a misspelled name.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        return lazy_attribute(__name__, _HOMES, globals(), name)


def __dir__() -> list[str]:
    return lazy_dir(globals(), __all__)
