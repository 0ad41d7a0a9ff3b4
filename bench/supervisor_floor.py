"""The least a supervisor built on workerkit's stack can cost: the ``floor-rq`` variant of
bench/startup_memory.py (issue 16, item 5).

``python -m bench.supervisor_floor [--share M1,M2] -- ARGS``: forks first thing, as workerkit's
CLI forks its early worker before the supervisor's own imports, and with the modules ``--share``
names imported before the fork: those that CLI imports before its own fork and both processes
use (bench/startup_memory.py passes ``workerkit.supervisor.forked.SHARED_IMPORTS`` less
workerkit's own; RQ and redis-py import them too), ``gc.freeze()`` first as there, so that their
pages are shared as in workerkit's pod, not loaded twice. The child runs ``rq ARGS`` in that
process, as the bare ``rq worker`` does. The parent then
does what every supervisor must and nothing else: it runs anyio's event loop (asyncio, the
backend workerkit uses), waits for SIGTERM or SIGINT on a signal receiver, passes it on to the
child, and waits for the child in a worker thread. No HTTP server, no metrics, no channel, no
workerkit module: whatever workerkit's supervisor adds is above this.

So ``floor-rq``'s tree (this parent plus a bare RQ worker) over bare RQ's is the ratio no
supervisor written with CPython and anyio can go under, whatever it leaves out.

``--stdlib`` (the ``floor-rq-stdlib`` variant): the parent waits with ``signal.sigwait`` and
imports nothing, not even anyio: the floor of a supervisor on CPython alone. It forks before any
import (its parent needs none of them, so sharing would save nothing).
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys

__all__ = ("main",)


def _child(args: list[str]) -> None:  # pragma: no cover - the forked worker
    from rq.cli import main as rq_main

    try:
        rq_main(args=args, prog_name="rq")
    finally:
        os._exit(0)


def _parent(child: int) -> int:
    import anyio
    import anyio.to_thread

    async def supervise() -> int:
        async with anyio.create_task_group() as tasks:
            status: list[int] = []

            async def reap() -> None:
                _, code = await anyio.to_thread.run_sync(os.waitpid, child, 0)
                status.append(os.waitstatus_to_exitcode(code))
                tasks.cancel_scope.cancel()

            tasks.start_soon(reap)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    os.kill(child, signum)
        return status[0] if status else 1

    return anyio.run(supervise)


def _parent_stdlib(child: int) -> int:
    """The same duty with the standard library's signals alone (they were blocked before the
    fork, so none is lost meanwhile)."""
    while True:
        signum = signal.sigwait({signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
        if signum != signal.SIGCHLD:
            os.kill(child, signum)
            continue
        pid, code = os.waitpid(child, os.WNOHANG)
        if pid == child:
            return os.waitstatus_to_exitcode(code)


def main(argv: list[str]) -> int:
    split = argv.index("--")  # [--stdlib] [--share M1,M2] -- ARGS: the options, then rq's
    options, args = argv[1:split], argv[split + 1 :]
    stdlib = "--stdlib" in options
    share = options[options.index("--share") + 1].split(",") if "--share" in options else []
    waited = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    if stdlib:
        signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    else:
        for name in share:
            importlib.import_module(name)
        gc.freeze()
    child = os.fork()
    if child == 0:
        if stdlib:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, waited)
        _child(args)
    return _parent_stdlib(child) if stdlib else _parent(child)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
