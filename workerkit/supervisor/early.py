"""The worker started early: spawned as soon as the settings are read, held at its start gate.

A worker's start is mostly its interpreter importing its engine (SQLAlchemy, rq) and the app;
the supervisor's is its own imports and the app check. Spawned first thing, the worker does its
imports on the pod's other core while the supervisor does its own, answers the app check itself
(:attr:`EarlyWorker.check`: no forked check importing the app and the engine a second time),
and waits at its gate (engines/startgate.py) before it touches its store. :meth:`EarlyWorker.go`
opens the gate once the checks passed and the channel and probes listen; :meth:`abandon` kills
it at the gate when the supervisor refuses to start: a refused configuration still runs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from workerkit import exitcodes, rundir
from workerkit.engines.appcheck import AppCheck, AppCheckStopped
from workerkit.engines.lifeline import SUPERVISOR_PID_ENV
from workerkit.engines.startgate import CHECK_ENV, GATE_ENV, GO
from workerkit.events import SOCKET_ENV
from workerkit.settings import settings_to_env
from workerkit.supervisor import forked
from workerkit.supervisor.process import ChildProcess

if TYPE_CHECKING:
    from workerkit.engines.base import Engine
    from workerkit.settings import Settings

__all__ = ("EarlyWorker", "remove_stale_directories", "start_early", "stopped_while_loading")

log = logging.getLogger("workerkit.supervisor.runner")


def remove_stale_directories() -> None:
    """Remove the runtime directories of supervisors SIGKILLed with their workers."""
    stale = rundir.remove_stale()
    if stale:
        log.info(
            "removed runtime directories left by dead supervisors",
            extra={"event": "stale_runtime_dirs_removed", "paths": [str(p) for p in stale]},
        )


class EarlyWorker:
    """The worker process waiting at its gate, the app check it answers, and the channel
    directory it will connect to."""

    def __init__(self, child: ChildProcess, directory: Path, gate: int, check: AppCheck) -> None:
        self.child = child
        self.directory = directory
        self.check = check
        self._gate: int | None = gate

    def go(self) -> None:
        """Open the gate: the worker loads the app, reaches its store and starts working."""
        gate, self._gate = self._gate, None
        if gate is None:
            return
        try:
            os.write(gate, GO)
        except OSError:  # the worker is gone already: the supervisor reaps and reports it
            pass
        finally:
            os.close(gate)

    def abandon(self) -> None:
        """The supervisor will not start: kill the worker at its gate, reap it, remove the
        directory. Safe to call after :meth:`go` (then it does nothing)."""
        gate, self._gate = self._gate, None
        if gate is None:
            return
        os.close(gate)  # end of file at the gate: a worker that reads it exits by itself
        pid = self.child.pid
        if pid is not None and self.child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        rundir.remove(self.directory)


def start_early(settings: Settings, engine: Engine) -> EarlyWorker | None:
    """Spawn the worker of ``engine`` at its gate; None when the engine's worker has no gate or
    the spawn fails (the supervisor then starts it as before, and reports why it cannot)."""
    if not getattr(engine, "start_gate", False):
        return None
    try:
        argv = engine.worker_command(settings)
    except Exception:
        return None
    # Stale directories of dead supervisors are removed (and logged) by the channel, once the
    # checks passed: a refused configuration prints its one line and nothing else.
    directory = rundir.create()
    # Pipes are not inheritable (PEP 446): the worker's ends are made so, and closed here after
    # the spawn (or the gate's end of file and the check's would never come).
    gate_read, gate_write = os.pipe()
    check_read, check_write = os.pipe()
    os.set_inheritable(gate_read, True)
    os.set_inheritable(check_write, True)
    env = {
        **os.environ,
        **settings_to_env(settings),
        SOCKET_ENV: str(directory / rundir.SOCKET_FILE),
        SUPERVISOR_PID_ENV: str(os.getpid()),
        GATE_ENV: str(gate_read),
        CHECK_ENV: str(check_write),
    }
    child = ChildProcess(argv, env)
    try:
        if not forked.start(child, keep=(gate_read, check_write), drop=(gate_write, check_read)):
            child.start()
    except OSError:
        os.close(gate_write)
        os.close(check_read)
        rundir.remove(directory)
        return None
    finally:
        os.close(gate_read)
        os.close(check_write)
    return EarlyWorker(child, directory, gate_write, AppCheck.of_worker(check_read, child.pid))


def stopped_while_loading(exc: AppCheckStopped) -> int:
    """Log a stop signal that came while the app loaded; the exit code (4: never ready).

    Nothing ran: the worker was killed at its gate (or the forked check), so the pod stops at
    once, as one stopped before ready does once the supervisor runs (supervisor_stopped)."""
    code = exitcodes.STARTUP_FAILED
    log.error(
        f"stopped before the worker was ready ({exc}); exit code {code}: "
        f"{exitcodes.describe(code)}",
        extra={
            "event": "supervisor_stopped",
            "outcome": "clean",
            "exit_code": code,
            "ready": False,
            "reason": exc.signal_name,
            "while": "loading the app",
            "waited": round(exc.waited, 3),
        },
    )
    return code
