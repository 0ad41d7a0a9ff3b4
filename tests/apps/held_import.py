"""The sql test app, whose import waits while the file named by ``E2E_HOLD_IMPORT`` exists.

Holds ``workerkit run``'s app check open (it imports the app) for as long as a test needs to look
at the worker spawned beside it; the test removes the file to let the start go on.
"""

from __future__ import annotations

import os
import time

from tests.apps.sql_jobs import app

__all__ = ("app",)

_hold = os.environ.get("E2E_HOLD_IMPORT")
while _hold and os.path.exists(_hold):
    time.sleep(0.01)
