"""The worker side of presence: write the records the supervisor sends to the engine's store.

The supervisor builds its worker's :class:`~workerkit.engines.presence.Presence` and sends it
(the ``presence`` command) to the worker's main process; :func:`install_presence` registers the
handler that hands each record to one background thread, which opens the store on the first
record and writes (replaces) it there. The command's reader thread is never blocked nor raised
into: a store outage is logged once (``presence_publish_failed``) and the next record retries.
:meth:`PresencePublisher.close` removes the record at a clean exit; a killed worker's record
expires (``Presence.ttl``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.presence import Presence, PresenceStore

if TYPE_CHECKING:
    from workerkit.events import EventClient

__all__ = ("CLOSE_TIMEOUT", "PresencePublisher", "install_presence")

log = logging.getLogger(__name__)

#: How long :meth:`PresencePublisher.close` waits for the store (a write in progress, then the
#: removal); past it the record is left to expire, and the worker's exit goes on.
CLOSE_TIMEOUT: Final = 2.0


class PresencePublisher:
    """Writes the latest presence record to the store from its own thread; thread-safe.

    Only the latest record counts: one that arrives while the last one is still being written
    replaces any record still waiting. Nothing is stamped here: the store stamps
    ``heartbeat_at`` with its own clock.
    """

    def __init__(self, open_store: Callable[[], PresenceStore]) -> None:
        self._open_store = open_store
        self._store: PresenceStore | None = None
        self._cond = threading.Condition()
        self._latest: Presence | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        #: The id of the last record handed to the store (what close() removes).
        self._worker_id: str | None = None
        self._failing = False

    def on_command(self, command: str, message: dict[str, Any]) -> None:
        """The client's command handler: takes ``presence`` records, ignores the rest."""
        if command != "presence":
            return
        presence = message.get("presence")
        if not isinstance(presence, Presence):
            return
        with self._cond:
            if self._closed:
                return
            self._latest = presence
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="workerkit-presence", daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # no thread to be had: the next record tries again
                    log.warning(
                        "presence not published: %s",
                        exc,
                        extra={"event": "presence_publish_failed", "error": str(exc)},
                    )
                    return
                self._thread = thread
            self._cond.notify()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Remove this worker's record (a clean exit); idempotent. Waits at most ``timeout``."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._latest = None
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning(
                    "presence record not removed: the store did not answer in time",
                    extra={"event": "presence_remove_failed", "error": "timed out"},
                )

    # --- the publishing thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._latest is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                record, self._latest = self._latest, None
            if record is not None:
                self._publish(record)
        self._remove()

    def _publish(self, record: Presence) -> None:
        try:
            if self._store is None:
                self._store = self._open_store()
            self._worker_id = record.worker_id
            self._store.publish(record)
        except Exception as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "presence not published (the next record tries again): %s",
                    exc,
                    extra={"event": "presence_publish_failed", "error": str(exc)},
                )
            return
        if self._failing:
            self._failing = False
            log.info("presence published again", extra={"event": "presence_publish_resumed"})

    def _remove(self) -> None:
        worker_id = self._worker_id
        if worker_id is None:  # nothing was ever written
            return
        try:
            if self._store is None:
                self._store = self._open_store()
            self._store.remove(worker_id)
        except Exception as exc:
            log.warning(
                "presence record not removed (it expires): %s",
                exc,
                extra={"event": "presence_remove_failed", "error": str(exc)},
            )
            return
        log.debug("presence removed", extra={"event": "presence_removed", "worker_id": worker_id})


def install_presence(
    client: EventClient, open_store: Callable[[], PresenceStore]
) -> PresencePublisher:
    """Publish the supervisor's presence records through ``open_store()`` (opened lazily).

    Call once in the worker's main process, after its client exists; call ``.close()`` on the
    result at a clean exit (it removes the record).
    """
    publisher = PresencePublisher(open_store)
    client.on_command(publisher.on_command)
    return publisher
