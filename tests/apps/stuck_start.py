"""A workerkit app whose worker never gets ready: deaf to SIGTERM while it "connects".

Stands for a worker stuck in its startup after its app check (a database or broker that does not
answer): the worker loads the app and answers the supervisor's app check, then, past its start
gate, gets stuck where it is given its settings. Only the worker process, the one given the
supervisor's socket, gets stuck.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

from tests.apps.journal import record
from workerkit.app import App

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("app",)


class StuckApp(App):
    """An App whose worker gets stuck as it is configured (after the start gate)."""

    def configure_settings(self, settings: Settings) -> None:
        if os.environ.get("WORKERKIT_SUPERVISOR_SOCKET"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            record(f"stuck {os.getpid()}")
            time.sleep(60)
        super().configure_settings(settings)


app = StuckApp()
