"""A workerkit app whose worker never gets ready: deaf to SIGTERM while it "connects".

Stands for a worker stuck in its startup (a broker that does not answer, a slow import); the
supervisor imports the module too (for the timing budget), so only the worker process, the one
given the supervisor's socket, gets stuck.
"""

from __future__ import annotations

import os
import signal
import time

from tests.apps.journal import record
from workerkit.app import App

__all__ = ("app",)

app = App()

if os.environ.get("WORKERKIT_SUPERVISOR_SOCKET"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record(f"stuck {os.getpid()}")
    time.sleep(60)
