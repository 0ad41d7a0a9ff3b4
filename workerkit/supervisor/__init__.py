"""The supervisor: the container's PID 1 that runs an engine's worker and stops it gracefully.

:func:`run_supervisor` is the entry point (``workerkit run ENGINE``). The pieces:
:mod:`~workerkit.supervisor.lifecycle` (the pure state machine), :mod:`~.channel` (the event
socket), :mod:`~.process` (the child and PID-1 reaping), :mod:`~.http` (the probes and
``/metrics``), :mod:`~.metrics` (the families the events move) and :mod:`~.runner` (anyio glue).
"""

from __future__ import annotations

from workerkit.supervisor.lifecycle import Lifecycle as Lifecycle
from workerkit.supervisor.lifecycle import State as State
from workerkit.supervisor.runner import Supervisor as Supervisor
from workerkit.supervisor.runner import run_supervisor as run_supervisor
from workerkit.supervisor.runner import supervise as supervise

__all__ = ("Lifecycle", "State", "Supervisor", "run_supervisor", "supervise")
