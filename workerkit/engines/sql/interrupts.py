"""Interrupting a job's thread, only while it runs the job's own code.

The main thread raises an exception in a job's thread (``PyThreadState_SetAsyncExc``) through a
:class:`Gate`, open only while the job's body runs; at most one per attempt. Why:
docs/engines/sql.md ("The worker").
"""

from __future__ import annotations

import ctypes
import threading
from typing import Literal

__all__ = ("Gate",)


def _raise_in(ident: int, exc_type: type[BaseException] | None) -> bool:
    """Make ``exc_type`` pending in thread ``ident`` (None: cancel the one pending there)."""
    changed = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc_type) if exc_type is not None else None
    )
    return bool(changed == 1)


class Gate:
    """When the main thread may interrupt one job's thread: only while its body runs.

    An interrupt asked for before the body began is raised as the body begins (so it does not
    begin); one asked for after it ended is not sent. Either way the main thread settled the
    delivery first, so nothing the job's thread writes afterwards counts.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: Literal["before", "open", "closed"] = "before"
        self._ident: int | None = None
        self._pending: type[BaseException] | None = None
        self.sent = False

    def interrupt(self, exc_type: type[BaseException]) -> bool:
        """Interrupt the body with ``exc_type`` (at its next bytecode; a blocking C call first
        returns). False when the body has ended, or an interrupt was already asked for."""
        with self._lock:
            if self.sent or self._state == "closed":
                return False
            self.sent = True
            if self._state == "before" or self._ident is None:
                self._pending = exc_type
                return True
            return _raise_in(self._ident, exc_type)

    def __enter__(self) -> None:
        """``with gate:`` around the body, in the job's thread: the one place an interrupt may
        land. (A class, not a generator: it wraps every job, a no-op job's included.)"""
        with self._lock:
            self._ident = threading.get_ident()
            pending, self._pending = self._pending, None
            self._state = "closed" if pending is not None else "open"
        if pending is not None:
            raise pending()  # taken back before the body began: it does not begin

    def __exit__(self, *exc_info: object) -> None:
        while True:
            try:
                with self._lock:
                    self._state = "closed"
                    if self.sent and self._ident is not None:
                        _raise_in(self._ident, None)  # sent, not landed yet: cancelled
                return
            except BaseException:
                if not self.sent:
                    raise
                # The one interrupt landed here, just as the body ended: the main thread has
                # settled the delivery already, so the gate only has to be closed again.
