"""For tests that run an RQ worker's ``work()`` in the test's own process."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

from workerkit.events import SOCKET_ENV

if TYPE_CHECKING:
    import pytest

__all__ = ("rq_worker_in_this_process",)

#: The signals RQ's ``work()`` (and workerkit's worker) install handlers for.
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@contextlib.contextmanager
def rq_worker_in_this_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No supervisor to talk to, and the signal handlers the worker installs put back after.

    Without it, a worker would connect to the socket named by a supervisor's environment, and
    the next test would run with the last worker's SIGTERM handler.
    """
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    saved = {sig: signal.getsignal(sig) for sig in _HANDLED}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
